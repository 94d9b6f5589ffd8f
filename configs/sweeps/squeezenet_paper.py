"""SqueezeNet Tables 2 and 3: vanilla SqueezeNet (v1.0), with simple and with complex bypass, and
v1.1, at Caffe's 227 px with the official solver's recipe (configs/squeezenet.py); AlexNet, the
baseline of Table 2, is shown from the paper.

    python sweep.py --config=configs/sweeps/squeezenet_paper.py --workdir=DIR [--complexity_only]
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      ml_collections.ConfigDict({
          'base': 'configs/squeezenet.py',
          'mode': 'product',
          'axes': (('model.bypass', ('none', 'simple', 'complex')),),
      }),
      ml_collections.ConfigDict({
          'base': 'configs/squeezenet.py:version=1.1',
          'mode': 'product',
          'axes': (('image_size', (227,)),),
      }),
  ]
  sweep.overrides = ()
  sweep.published = ('SqueezeNet Table 2',)
  return sweep
