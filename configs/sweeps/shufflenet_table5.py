"""ShuffleNet Table 5: ShuffleNets against MobileNets of similar cost, each with its paper's
recipe: ShuffleNet 2x, 2x with SE (`model.se_reduction=16`), 1.5x (g = 3), 1x (g = 8), 0.5x
(g = 4), 0.5x shallow (g = 3; `model.shallow=True` at alpha 0.71, see models/shufflenet.py) and
1.0, 0.75, 0.5 and 0.25 MobileNet-224.

    python sweep.py --config=configs/sweeps/shufflenet_table5.py --workdir=DIR [--complexity_only]
"""

import ml_collections


def _shufflenet(arg, axes):
  return ml_collections.ConfigDict(
      {'base': f'configs/shufflenet.py:{arg}', 'mode': 'zip', 'axes': axes})


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      ml_collections.ConfigDict({
          'base': 'configs/shufflenet.py',
          'mode': 'zip',
          'axes': (('model.groups', (3, 3, 8, 4)), ('model.alpha', (2.0, 1.5, 1.0, 0.5))),
      }),
      _shufflenet('groups=3,scale=2.0', (('model.se_reduction', (16,)),)),
      _shufflenet('groups=3,scale=0.71', (('model.shallow', (True,)),)),
      ml_collections.ConfigDict({
          'base': 'configs/mobilenet_v1.py',
          'mode': 'product',
          'axes': (('model.alpha', (1.0, 0.75, 0.5, 0.25)),),
      }),
  ]
  sweep.overrides = ()
  return sweep
