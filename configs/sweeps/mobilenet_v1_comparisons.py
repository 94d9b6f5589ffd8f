"""MobileNet V1 Tables 8 and 9: 1.0 MobileNet-224 and 0.50 MobileNet-160 against popular models.
SqueezeNet (v1.0 at 227 px, configs/squeezenet.py) is built here; GoogleNet, VGG 16 and AlexNet are
shown from the paper. Table 10 (Stanford Dogs, against Inception V3) is mobilenet_v1_table10.py.

    python sweep.py --config=configs/sweeps/mobilenet_v1_comparisons.py --workdir=DIR \
        [--complexity_only]
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      ml_collections.ConfigDict({
          'base': 'configs/mobilenet_v1.py',
          'mode': 'zip',
          'axes': (('model.alpha', (1.0, 0.5)), ('image_size', (224, 160))),
      }),
      ml_collections.ConfigDict({
          'base': 'configs/squeezenet.py',
          'mode': 'product',
          'axes': (('image_size', (227,)),),
      }),
  ]
  sweep.overrides = ()
  sweep.published = ('MobileNet V1 Table 8', 'MobileNet V1 Table 9')
  return sweep
