"""Fine-tuning an ImageNet MobileNet V1 on Stanford Dogs (Howard et al. 2017, Table 10).

    python convert.py --format=tf_slim --source=mobilenet_v1_1.0_224.ckpt \
        --config=configs/mobilenet_v1.py --workdir=runs/slim_v1_1.0_224
    python main.py --config=configs/stanford_dogs.py:alpha=1.0,res=224 \
        --config.init_from=runs/slim_v1_1.0_224 --workdir=runs/dogs_v1_1.0_224

Stanford Dogs (TFDS `stanford_dogs`: 12,000 training and 8,580 test images of 120 breeds) is
downloaded and prepared by TFDS on first use (internet needed). `init_from` is a workdir holding an
ImageNet MobileNet V1 of the same alpha, converted with convert.py or trained here; its classifier
is replaced by a 120-class one. The 192 px rows of Table 10 fine-tune the same weights at 192 px.

The paper pretrains on a large, noisy set of dog images from the web before fine-tuning on the
Stanford Dogs training set, and gives neither that set nor the fine-tuning recipe. This recipe
fine-tunes from ImageNet directly: the whole network for 30 epochs with SGD (Nesterov momentum
0.9) at lr 0.01 for batch 64, scaled with the batch, one warm-up epoch then cosine decay, the
papers' small L2 weight decay (none on depthwise kernels), label smoothing 0.1 and the Inception
crop; evaluation on the test split, the split Table 10 reports.
"""

from configs import default
from configs import mobilenet_v1


def get_config(arg=None):
  args = default.parse_arg(arg, alpha=1.0, res=224, init_from='')
  config = mobilenet_v1.get_config(f'alpha={args.alpha},res={args.res}')
  config.init_from = args.init_from

  config.dataset = 'stanford_dogs'
  config.download = True
  config.num_classes = 120
  config.label_offset = 0
  config.train_split = 'train'
  config.eval_split = 'test'
  config.augment = 'inception_crop'
  config.shuffle_buffer = 12_000

  config.batch_size = 64
  config.eval_batch_size = 500
  config.num_epochs = 30.0
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.nesterov = True
  config.learning_rate = 0.01
  config.lr_reference_batch_size = 64
  config.schedule = 'cosine'
  config.warmup_epochs = 1.0
  config.weight_decay = 4e-5
  config.weight_decay_type = 'l2'
  config.label_smoothing = 0.1
  config.eval_every_epochs = 1.0
  config.checkpoint_every_epochs = 1.0
  return config
