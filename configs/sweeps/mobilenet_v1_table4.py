"""MobileNet V1 Table 4: depthwise separable against full convolutions ("Conv MobileNet",
`model.separable=False`) at 1.0 MobileNet-224, with the paper's recipe (configs/mobilenet_v1.py).

    python sweep.py --config=configs/sweeps/mobilenet_v1_table4.py --workdir=DIR [--complexity_only]
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({
      'base': 'configs/mobilenet_v1.py',
      'mode': 'product',
      'axes': (('model.separable', (False, True)),),
  })]
  sweep.overrides = ()
  return sweep
