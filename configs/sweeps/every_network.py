"""Every network of the three papers and the seed deck, for one latency table
(`--latency_only`, docs/latency.md) or one complexity table: the MobileNet V1 (16 points) and V2
(21) grids, Conv and Shallow MobileNet (V1 Tables 4-5), ShuffleNet's Table 2 grid with 1.5x and 2x
(17), 2x with SE and the shallow 0.5x (Table 5), 1x without shuffle at g = 3 and 8 (Table 3),
SqueezeNet v1.0 (vanilla, simple and complex bypass) and v1.1, Xception, and the ResNet, ResNeXt
and VGG-like structures of ShuffleNet Table 4 (72 points).

    python sweep.py --config=configs/sweeps/every_network.py --workdir=DIR --latency_only
"""

import ml_collections

from configs.sweeps import mobilenet_v1_paper
from configs.sweeps import mobilenet_v2_paper
from configs.sweeps import shufflenet_paper
from configs.sweeps import shufflenet_table4


def _group(base, axes, mode='product'):
  return ml_collections.ConfigDict({'base': base, 'mode': mode, 'axes': axes})


def get_config():
  sweep = ml_collections.ConfigDict()
  table4 = [g for g in shufflenet_table4.get_config().groups if 'table4' in g.base]
  sweep.groups = [
      *mobilenet_v1_paper.get_config().groups,
      _group('configs/mobilenet_v1.py', (('model.separable', (False,)),)),
      _group('configs/mobilenet_v1.py', (('model.shallow', (True,)),)),
      *mobilenet_v2_paper.get_config().groups,
      *shufflenet_paper.get_config().groups,
      _group('configs/shufflenet.py:groups=3,scale=2.0', (('model.se_reduction', (16,)),)),
      _group('configs/shufflenet.py:groups=3,scale=0.71', (('model.shallow', (True,)),)),
      _group('configs/shufflenet.py', (('model.groups', (3, 8)),
                                       ('model.channel_shuffle', (False,)))),
      _group('configs/squeezenet.py', (('model.bypass', ('none', 'simple', 'complex')),)),
      _group('configs/squeezenet.py:version=1.1', (('image_size', (227,)),)),
      _group('configs/xception.py', (('image_size', (299,)),)),
      *table4,
  ]
  sweep.overrides = ()
  return sweep
