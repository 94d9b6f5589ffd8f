"""The offline demonstration sweep on Fashion-MNIST: MobileNet V1 (alpha 0.25, 0.5, 0.75 at 32 px
and 0.25, 0.5 at 48 px), MobileNet V2 (0.35, 0.5, 0.75) and ShuffleNet g = 3 (0.25, 0.5, 1) at 32
px, with the quickstart recipe (configs/quickstart.py) shortened to EPOCHS epochs per point.

    python sweep.py --config=configs/sweeps/quickstart.py --workdir=runs/sweep_quickstart
"""

import ml_collections

EPOCHS = 1.0


def _group(base, widths, resolutions):
  return ml_collections.ConfigDict({
      'base': base, 'mode': 'product',
      'axes': (('model.alpha', widths), ('image_size', resolutions)),
  })


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      _group('configs/quickstart.py:model=mobilenet_v1', (0.25, 0.5, 0.75), (32,)),
      _group('configs/quickstart.py:model=mobilenet_v1', (0.25, 0.5), (48,)),
      _group('configs/quickstart.py:model=mobilenet_v2', (0.35, 0.5, 0.75), (32,)),
      _group('configs/quickstart.py:model=shufflenet,groups=3', (0.25, 0.5, 1.0), (32,)),
  ]
  sweep.overrides = (('num_epochs', EPOCHS),)
  return sweep
