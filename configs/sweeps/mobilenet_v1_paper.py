"""MobileNet V1 on ImageNet: alpha 1.0/0.75/0.5/0.25 x 224/192/160/128 px (paper Figure 4,
Tables 6-7), each point with the paper's recipe (configs/mobilenet_v1.py).

    python sweep.py --config=configs/sweeps/mobilenet_v1_paper.py --workdir=DIR
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({
      'base': 'configs/mobilenet_v1.py',
      'mode': 'product',
      'axes': (('model.alpha', (1.0, 0.75, 0.5, 0.25)), ('image_size', (224, 192, 160, 128))),
  })]
  sweep.overrides = ()  # (field, value) pairs applied to every point
  return sweep
