"""MobileNet V1 Table 5: narrow against shallow at similar cost, 0.75 MobileNet-224 against
"Shallow MobileNet" (1.0 without the five 14 x 14 x 512 separable blocks, `model.shallow=True`),
with the paper's recipe (configs/mobilenet_v1.py).

    python sweep.py --config=configs/sweeps/mobilenet_v1_table5.py --workdir=DIR [--complexity_only]
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({
      'base': 'configs/mobilenet_v1.py',
      'mode': 'zip',
      'axes': (('model.alpha', (0.75, 1.0)), ('model.shallow', (False, True))),
  })]
  sweep.overrides = ()
  return sweep
