"""MobileNet V1 on ImageNet (Howard et al. 2017).

Arguments: `--config=configs/mobilenet_v1.py:alpha=0.5,res=160`.
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arg(arg, alpha=1.0, res=224)
  config = default.get_config()
  default.set_model(config, 'mobilenet_v1', args.alpha)
  # TF-slim's MobileNet V1: dropout keep probability 0.999, BatchNorm decay 0.9997, epsilon 1e-3.
  config.model.dropout_rate = 0.001
  config.model.bn_momentum = 0.9997
  config.model.bn_epsilon = 1e-3
  config.image_size = args.res

  # Section 3.2: RMSProp, little weight decay and none on the depthwise kernels; the TF release
  # decayed lr 0.045 by 0.94 every 2.5 epochs; no label smoothing.
  default.set_rmsprop_recipe(config, lr_decay_rate=0.94, lr_decay_epochs=2.5)
  return config
