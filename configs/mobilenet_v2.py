"""MobileNet V2 on ImageNet (Sandler et al. 2018).

Arguments: `--config=configs/mobilenet_v2.py:alpha=0.5,res=160`.
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arg(arg, alpha=1.0, res=224)
  config = default.get_config()
  config.model.name = 'mobilenet_v2'
  config.model.alpha = args.alpha
  # TF-slim's MobileNet V2: dropout keep probability 0.8, BatchNorm decay 0.997, epsilon 1e-3.
  config.model.dropout_rate = 0.2
  config.model.bn_momentum = 0.997
  config.model.bn_epsilon = 1e-3
  config.image_size = args.res
  return config
