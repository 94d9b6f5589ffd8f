"""The offline main job: MobileNet V1 (alpha 0.25, 48 px) on Fashion-MNIST, 5 epochs, 3 to 5
minutes on a 2-core CPU.

    python main.py --config=configs/quickstart.py --workdir=runs/quickstart

Fashion-MNIST is read from Debian's `dataset-fashion-mnist` files when they are installed
(setup.sh installs them), otherwise TFDS downloads it. The 28x28 grayscale images are resized once
to 48x48 RGB (rho = 48/224: the 2x2 final feature map keeps more of the image than the 1x1 map of
32 px inputs).
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arg(arg, model='mobilenet_v1', alpha=0.25, groups=3, res=48, epochs=5.0)
  config = default.get_config()
  default.set_model(config, args.model, args.alpha, args.groups)
  if 'zero_init_residual' in config.model:
    # Without it the wider MobileNet V2 and ShuffleNets diverge early in runs this short.
    config.model.zero_init_residual = True
  config.model.dropout_rate = 0.0
  config.model.bn_momentum = 0.9
  config.model.bn_epsilon = 1e-3
  config.image_size = args.res

  config.dataset = 'fashion_mnist'
  config.download = True  # only used when the local files are missing
  config.num_classes = 10
  config.train_split = 'train'
  config.eval_split = 'test'
  config.cache = True
  config.shuffle_buffer = 60_000
  config.augment = 'pad_crop'
  config.crop_padding = 0  # flips only: random crops did not help runs this short

  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = args.epochs
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.nesterov = True
  config.learning_rate = 0.1
  config.schedule = 'cosine'
  config.warmup_epochs = 0.2
  config.weight_decay = 5e-5
  config.label_smoothing = 0.1

  config.log_every_steps = 100  # evaluation and checkpoints: once an epoch (the default)
  return config
