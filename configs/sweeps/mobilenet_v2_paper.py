"""MobileNet V2 on ImageNet: alpha 0.35/0.5/0.75/1.0 x 224/192/160/128/96 px plus 1.4 at 224 px
(paper Figure 5), each point with the paper's recipe (configs/mobilenet_v2.py).

    python sweep.py --config=configs/sweeps/mobilenet_v2_paper.py --workdir=DIR
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      ml_collections.ConfigDict({
          'base': 'configs/mobilenet_v2.py',
          'mode': 'product',
          'axes': (('model.alpha', (0.35, 0.5, 0.75, 1.0)),
                   ('image_size', (224, 192, 160, 128, 96))),
      }),
      ml_collections.ConfigDict({
          'base': 'configs/mobilenet_v2.py',
          'mode': 'product',
          'axes': (('model.alpha', (1.4,)), ('image_size', (224,))),
      }),
  ]
  sweep.overrides = ()
  return sweep
