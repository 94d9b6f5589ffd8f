"""The offline distillation demonstration on Fashion-MNIST (docs/distillation.md): MobileNet V1
0.25 at 32 px trained with the quickstart recipe (configs/quickstart.py, 5 epochs) on the labels
alone and with a ShuffleNet 1x (g = 3) teacher, SEEDS seeds each, so that the gain can be set
against the run-to-run spread. Train the teacher first:

    python main.py --config=configs/quickstart.py:model=shufflenet,groups=3,alpha=1.0,res=32 \
        --workdir=runs/distill_teacher
    python sweep.py --config=configs/sweeps/distillation_fashion_mnist.py --workdir=runs/distill
"""

import ml_collections

TEACHER = 'runs/distill_teacher'  # relative to the repository root, where sweep.py runs points
SEEDS = (0, 1, 2)


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({
      'base': 'configs/quickstart.py:model=mobilenet_v1,alpha=0.25,res=32', 'mode': 'product',
      'axes': (('distill.teacher', ('', TEACHER)), ('seed', SEEDS)),
  })]
  sweep.overrides = ()
  return sweep
