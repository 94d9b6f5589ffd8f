"""ShuffleNet on ImageNet: groups 1/2/3/4/8 x scale 0.25/0.5/1 (paper Table 2) and the Table 5
points 1.5x and 2x at g = 3, each with the paper's recipe (configs/shufflenet.py). The scale
factor s is `model.alpha`.

    python sweep.py --config=configs/sweeps/shufflenet_paper.py --workdir=DIR
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      ml_collections.ConfigDict({
          'base': 'configs/shufflenet.py',
          'mode': 'product',
          'axes': (('model.groups', (1, 2, 3, 4, 8)), ('model.alpha', (0.25, 0.5, 1.0))),
      }),
      ml_collections.ConfigDict({
          'base': 'configs/shufflenet.py',
          'mode': 'zip',
          'axes': (('model.groups', (3, 3)), ('model.alpha', (1.5, 2.0))),
      }),
  ]
  sweep.overrides = ()
  return sweep
