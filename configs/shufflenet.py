"""ShuffleNet v1 on ImageNet (Zhang et al. 2017).

Arguments: `--config=configs/shufflenet.py:groups=8,scale=0.5,res=224`; `scale` is the paper's
"ShuffleNet s x" factor, stored as `model.alpha`.
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arg(arg, groups=3, scale=1.0, res=224)
  config = default.get_config()
  default.set_model(config, 'shufflenet', args.scale, args.groups)
  config.image_size = args.res

  # Section 4: SGD with momentum 0.9, weight decay 4e-5, lr 0.5 decayed linearly to 0 over
  # 3e5 iterations at batch 1024; the official re-implementation adds label smoothing 0.1 and
  # decays every convolution kernel, depthwise included.
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_train_steps = 300_000
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.learning_rate = 0.5
  config.lr_reference_batch_size = 1024
  config.schedule = 'linear'
  config.weight_decay = 4e-5
  config.weight_decay_type = 'l2'
  config.weight_decay_exclude = r'.*/bias|.*/scale'
  config.label_smoothing = 0.1
  return config
