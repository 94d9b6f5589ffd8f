"""SqueezeNet on ImageNet (Iandola et al. 2016), versions 1.0 and 1.1 and section 6's bypasses.

Arguments: `--config=configs/squeezenet.py:version=1.1,bypass=simple,res=227`.
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arg(arg, version='1.0', bypass='none', res=227)
  config = default.get_config()
  default.set_model(config, 'squeezenet', 1.0)
  config.model.version = args.version
  config.model.bypass = args.bypass
  config.model.dropout_rate = 0.5  # the official train_val.prototxt's drop9
  # Caffe's 227 px crops. Caffe subtracted the mean pixel without scaling; these are torchvision's
  # and pytorchcv's ImageNet means and deviations, as their SqueezeNet weights expect: unscaled
  # inputs (+-128) diverged within 3 steps in short runs with this codebase's initialisation.
  config.image_size = args.res
  config.normalization_mean = (123.675, 116.28, 103.53)
  config.normalization_std = (58.395, 57.12, 57.375)

  # The official solver.prototxt (both versions): SGD with momentum 0.9, lr 0.04 decayed linearly
  # to 0 ("poly", power 1) over 170,000 iterations of 32 x iter_size 16 = 512 images, weight decay
  # 2e-4 on every parameter (Caffe decays biases too).
  config.batch_size = 512
  config.eval_batch_size = 500
  config.num_train_steps = 170_000
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.learning_rate = 0.04
  config.lr_reference_batch_size = 512
  config.schedule = 'linear'
  config.weight_decay = 2e-4
  config.weight_decay_type = 'l2'
  config.weight_decay_exclude = ''
  return config
