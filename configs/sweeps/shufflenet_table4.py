"""ShuffleNet Table 4: classification error of ShuffleNet's layout with other structures at 140,
38 and 13 MFLOPs, each with ShuffleNet's recipe: VGG-like (140 only, as the paper), ResNet and
ResNeXt (configs/shufflenet_table4.py, models/shufflenet_structures.py), Xception-like (ShuffleNet
g = 1) and ShuffleNet (g = 8, 4 and 8, the table's best of Table 2).

    python sweep.py --config=configs/sweeps/shufflenet_table4.py --workdir=DIR [--complexity_only]
"""

import ml_collections

SCALES = (1.0, 0.5, 0.25)  # 140, 38 and 13 MFLOPs


def _group(base, axes, mode='product'):
  return ml_collections.ConfigDict({'base': base, 'mode': mode, 'axes': axes})


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      _group('configs/shufflenet_table4.py:unit=vgg', (('model.alpha', (1.0,)),)),
      _group('configs/shufflenet_table4.py:unit=resnet', (('model.alpha', SCALES),)),
      _group('configs/shufflenet_table4.py:unit=resnext', (('model.alpha', SCALES),)),
      _group('configs/shufflenet.py:groups=1', (('model.alpha', SCALES),)),
      _group('configs/shufflenet.py', (('model.groups', (8, 4, 8)), ('model.alpha', SCALES)),
             mode='zip'),
  ]
  sweep.overrides = ()
  return sweep
