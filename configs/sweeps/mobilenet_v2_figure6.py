"""MobileNet V2 Figure 6 (section 6.1): (a) the linear bottleneck against a ReLU6 after the
projection (`model.bottleneck_activation`), (b) shortcuts between the bottlenecks against
shortcuts between the expansions and no residual (`model.shortcut`), at 1.0 / 224 px with the
paper's recipe (configs/mobilenet_v2.py). The paper plots these as training curves without
numbers, so the collected table has no published top-1 for them. None changes the MAdds.

    python sweep.py --config=configs/sweeps/mobilenet_v2_figure6.py --workdir=DIR [--complexity_only]
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      ml_collections.ConfigDict({
          'base': 'configs/mobilenet_v2.py',
          'mode': 'product',
          'axes': (('model.bottleneck_activation', ('linear', 'relu6')),),
      }),
      ml_collections.ConfigDict({
          'base': 'configs/mobilenet_v2.py',
          'mode': 'product',
          'axes': (('model.shortcut', ('expansion', 'none')),),
      }),
  ]
  sweep.overrides = ()
  return sweep
