"""Xception Tables 1 and 3: Xception at 299 px with the paper's recipe (configs/xception.py);
VGG-16, ResNet-152 and Inception V3, its comparisons, are shown from the paper.

    python sweep.py --config=configs/sweeps/xception_paper.py --workdir=DIR [--complexity_only]
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({
      'base': 'configs/xception.py',
      'mode': 'product',
      'axes': (('image_size', (299,)),),
  })]
  sweep.overrides = ()
  sweep.published = ('Xception Table 1', 'Xception Tables 1 and 3')
  return sweep
