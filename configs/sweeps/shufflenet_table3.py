"""ShuffleNet Table 3: with and without the channel shuffle (`model.channel_shuffle`) for 1x,
0.5x and 0.25x at g = 3 and 8, with the paper's recipe (configs/shufflenet.py).

    python sweep.py --config=configs/sweeps/shufflenet_table3.py --workdir=DIR [--complexity_only]
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({
      'base': 'configs/shufflenet.py',
      'mode': 'product',
      'axes': (('model.groups', (3, 8)), ('model.alpha', (1.0, 0.5, 0.25)),
               ('model.channel_shuffle', (True, False))),
  })]
  sweep.overrides = ()
  return sweep
