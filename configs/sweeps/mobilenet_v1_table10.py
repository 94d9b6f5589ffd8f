"""MobileNet V1 Table 10: fine-tuning on Stanford Dogs (configs/stanford_dogs.py), 1.0 and 0.75
MobileNet at 224 and 192 px, each from the ImageNet MobileNet of its alpha in PRETRAINED (relative
to the repository root; convert the TF-slim checkpoints there first, README "Pretrained weights",
or point PRETRAINED at your own runs). Inception V3, the table's comparison, is shown from the
paper.

    python sweep.py --config=configs/sweeps/mobilenet_v1_table10.py --workdir=DIR [--complexity_only]
"""

import ml_collections

PRETRAINED = 'runs/slim_v1_{alpha}_224'
ROWS = ((1.0, 224), (0.75, 224), (1.0, 192), (0.75, 192))  # (alpha, resolution), Table 10


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({
      'base': 'configs/stanford_dogs.py',
      'mode': 'zip',
      'axes': (('model.alpha', tuple(alpha for alpha, _ in ROWS)),
               ('image_size', tuple(res for _, res in ROWS)),
               ('init_from', tuple(PRETRAINED.format(alpha=alpha) for alpha, _ in ROWS))),
  })]
  sweep.overrides = ()
  sweep.published = ('MobileNet V1 Table 10',)
  return sweep
