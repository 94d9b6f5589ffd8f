"""MobileNet V2 on ImageNet (Sandler et al. 2018).

Arguments: `--config=configs/mobilenet_v2.py:alpha=0.5,res=160`.
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arg(arg, alpha=1.0, res=224)
  config = default.get_config()
  default.set_model(config, 'mobilenet_v2', args.alpha)
  # TF-slim's MobileNet V2: dropout keep probability 0.8, BatchNorm decay 0.997, epsilon 1e-3.
  config.model.dropout_rate = 0.2
  config.model.bn_momentum = 0.997
  config.model.bn_epsilon = 1e-3
  config.image_size = args.res

  # Section 6.1: RMSProp (decay 0.9, momentum 0.9), weight decay 4e-5, lr 0.045 decayed by 0.98
  # per epoch, batch 96 on each of 16 GPUs; the TF release adds label smoothing 0.1 and an EMA of
  # the weights (0.9999). 300 epochs as in torchvision's reproduction (71.88% top-1).
  default.set_rmsprop_recipe(config, lr_decay_rate=0.98, lr_decay_epochs=1.0)
  config.label_smoothing = 0.1
  config.ema_decay = 0.9999
  return config
