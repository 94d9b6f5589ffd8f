"""CIFAR-10 through TFDS (32 px), for users with internet access; pick the network by argument.

    python main.py --config=configs/cifar10.py:model=mobilenet_v2,alpha=1.0 --workdir=runs/c10

TFDS downloads and prepares `cifar10` on first use. The networks keep their ImageNet strides
unless `small_input=true` removes the first two downsamplings (32 px -> 4x4 final features).
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arg(arg, model='mobilenet_v2', alpha=1.0, groups=3, small_input=True)
  config = default.get_config()
  default.set_model(config, args.model, args.alpha, args.groups)
  config.model.small_input = args.small_input
  config.model.dropout_rate = 0.1

  config.dataset = 'cifar10'
  config.download = True
  config.num_classes = 10
  config.image_size = 32
  config.train_split = 'train'
  config.eval_split = 'test'
  config.cache = True
  config.shuffle_buffer = 50_000
  config.augment = 'pad_crop'
  config.crop_padding = 4
  config.normalization_mean = (125.3, 123.0, 113.9)
  config.normalization_std = (63.0, 62.1, 66.7)

  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 200.0
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.nesterov = True
  config.learning_rate = 0.1
  config.schedule = 'cosine'
  config.warmup_epochs = 1.0
  config.weight_decay = 5e-4
  config.label_smoothing = 0.0
  config.log_every_steps = 100
  config.eval_every_epochs = 5.0
  config.checkpoint_every_epochs = 5.0
  return config
