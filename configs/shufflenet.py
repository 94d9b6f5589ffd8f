"""ShuffleNet v1 on ImageNet (Zhang et al. 2017).

Arguments: `--config=configs/shufflenet.py:groups=8,scale=0.5,res=224`; `scale` is the paper's
"ShuffleNet s x" factor, stored as `model.alpha`.
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arg(arg, groups=3, scale=1.0, res=224)
  config = default.get_config()
  config.model.name = 'shufflenet'
  config.model.alpha = args.scale
  config.model.groups = args.groups
  config.image_size = args.res
  return config
