"""The offline ablation demonstration on Fashion-MNIST: two of the papers' ablations, each setting
trained for each of EPOCHS with SEEDS seeds, so that its effect can be set against the run-to-run
spread.

- ShuffleNet Table 3: channel shuffle on and off for ShuffleNet 0.5x, g = 8 (the paper's largest
  effect is at g = 8: 5.8 points of ImageNet top-1 at 0.5x).
- MobileNet V2 Figure 6a: the linear bottleneck against a ReLU6 after the projection, at alpha 0.35.

Every point is the quickstart recipe (configs/quickstart.py) at 32 px.

    python sweep.py --config=configs/sweeps/ablations_fashion_mnist.py --workdir=runs/ablations
"""

import ml_collections

EPOCHS = (1.0, 3.0)
SEEDS = (0, 1, 2)


def _group(base, field, values):
  return ml_collections.ConfigDict({
      'base': base, 'mode': 'product',
      'axes': (('num_epochs', EPOCHS), ('seed', SEEDS), (field, values)),
  })


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      _group('configs/quickstart.py:model=shufflenet,groups=8,alpha=0.5,res=32',
             'model.channel_shuffle', (True, False)),
      _group('configs/quickstart.py:model=mobilenet_v2,alpha=0.35,res=32',
             'model.bottleneck_activation', ('linear', 'relu6')),
  ]
  sweep.overrides = ()
  return sweep
