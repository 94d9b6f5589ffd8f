"""ShuffleNet Table 4's other structures in ShuffleNet's layout (models/shufflenet_structures.py).

Arguments: `--config=configs/shufflenet_table4.py:unit=resnet,scale=0.5,res=224`; `unit` is vgg,
resnet or resnext (Xception-like is configs/shufflenet.py:groups=1), `scale` the ShuffleNet scale
of the same complexity: 1 (140 MFLOPs), 0.5 (38) or 0.25 (13).
"""

from configs import default
from configs import shufflenet


def get_config(arg=None):
  args = default.parse_arg(arg, unit='resnet', scale=1.0, res=224)
  # Section 4.2 trains every structure with ShuffleNet's own recipe.
  config = shufflenet.get_config(f'scale={args.scale},res={args.res}')
  config.model = default.get_config().model
  default.set_model(config, f'table4_{args.unit}', args.scale)
  return config
