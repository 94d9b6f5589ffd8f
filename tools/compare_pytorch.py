r"""Train-step images/s of our networks against the same networks in PyTorch eager, in one run.

    python tools/compare_pytorch.py                       # README's table: all rows, 20 steps
    python tools/compare_pytorch.py --rows=v2_0.5_32 --steps=50 --json

Each row times both sides in the same process, one after the other, and reports their ratio
(these machines are noisy; compare ratios, not images/s across runs). Both sides: float32,
random data already in memory, SGD with momentum 0.9 and L2 weight decay, 1000 classes, the same
batch, every host core. Ours is benchmark.py's timing of train.py's pmapped train step (uint8
images normalized in the step, the model's `conv_impl='auto'`); PyTorch's is pytorchcv's network
(the peer of tests/test_convert.py; its fixed 7x7 final pooling replaced by a global one so that
small inputs run) in channels_last memory format: forward, cross-entropy, backward and
`optimizer.step()`. The median step time after `--warmup` steps counts.

PyTorch and pytorchcv come with requirements-test.txt and requirements-peers.txt (setup.sh).
"""

import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hugepages  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  hugepages.restart_with_huge_pages()  # as train.py, for both sides

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from pytorchcv.models import mobilenet, mobilenetv2, shufflenet  # pylint: disable=g-import-not-at-top,wrong-import-position

import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import mobilenet_v1, mobilenet_v2  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import shufflenet as shufflenet_config  # pylint: disable=g-import-not-at-top,wrong-import-position


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  config: object  # a configs module
  config_arg: str
  peer: object  # the pytorchcv constructor
  batch_size: int


ROWS = {
    'v1_0.25_48': Row('MobileNet V1 0.25, 48 px', mobilenet_v1, 'alpha=0.25,res=48',
                      mobilenet.mobilenet_wd4, 128),
    'v2_0.5_32': Row('MobileNet V2 0.5, 32 px', mobilenet_v2, 'alpha=0.5,res=32',
                     mobilenetv2.mobilenetv2_wd2, 128),
    'shufflenet_g3_32': Row('ShuffleNet g=3 1x, 32 px', shufflenet_config, 'groups=3,res=32',
                            shufflenet.shufflenet_g3_w1, 128),
    'v1_1.0_224': Row('MobileNet V1 1.0, 224 px', mobilenet_v1, 'alpha=1.0,res=224',
                      mobilenet.mobilenet_w1, 32),
    'v2_1.0_224': Row('MobileNet V2 1.0, 224 px', mobilenet_v2, 'alpha=1.0,res=224',
                      mobilenetv2.mobilenetv2_w1, 32),
}
MOMENTUM = 0.9
WEIGHT_DECAY = 4e-5
LEARNING_RATE = 0.01


def our_config(row: Row):
  """The row's config with the comparison's shared settings (SGD, no EMA or smoothing)."""
  config = row.config.get_config(row.config_arg)
  config.batch_size = row.batch_size
  config.optimizer = 'sgd'
  config.nesterov = False
  config.momentum = MOMENTUM
  config.learning_rate = LEARNING_RATE
  config.weight_decay = WEIGHT_DECAY
  config.weight_decay_type = 'l2'
  config.weight_decay_exclude = ''
  config.ema_decay = 0.0
  config.label_smoothing = 0.0
  config.model.dropout_rate = 0.0
  config.half_precision = False
  return config


def pytorch_step_seconds(row: Row, image_size: int, steps: int, warmup: int) -> float:
  """Median seconds of one eager PyTorch training step of the row's pytorchcv network."""
  torch.manual_seed(0)
  model = row.peer()
  model.features.final_pool = torch.nn.AdaptiveAvgPool2d(1)
  model = model.to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY)
  images = torch.randn(row.batch_size, 3, image_size, image_size).to(
      memory_format=torch.channels_last)
  labels = torch.randint(0, 1000, (row.batch_size,))
  loss_fn = torch.nn.CrossEntropyLoss()
  times = []
  for step in range(warmup + steps):
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(images), labels).backward()
    optimizer.step()
    if step >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def compare(row: Row, steps: int, warmup: int) -> dict:
  config = our_config(row)
  ours, _ = benchmark.time_train_step(config, steps, warmup)
  theirs = pytorch_step_seconds(row, config.image_size, steps, warmup)
  return {'row': row.name, 'batch_size': row.batch_size,
          'ours_images_per_sec': row.batch_size / ours,
          'pytorch_images_per_sec': row.batch_size / theirs, 'ratio': theirs / ours}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  unknown = set(flags.FLAGS.rows) - set(ROWS)
  if unknown:
    raise app.UsageError(f'Unknown rows {sorted(unknown)}; valid: {", ".join(ROWS)}.')
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; '
        f'{os.cpu_count()} CPUs', flush=True)
  if not flags.FLAGS.json:
    print('| network | batch | ours (images/s) | PyTorch eager | ours / PyTorch |\n|---|---|---|---|---|')
  for key in flags.FLAGS.rows:
    result = compare(ROWS[key], flags.FLAGS.steps, flags.FLAGS.warmup)
    if flags.FLAGS.json:
      print(json.dumps(result), flush=True)
    else:
      print(f'| {result["row"]} | {result["batch_size"]} | {result["ours_images_per_sec"]:,.1f} '
            f'| {result["pytorch_images_per_sec"]:,.1f} | {result["ratio"]:.2f}x |', flush=True)


if __name__ == '__main__':
  flags.DEFINE_list('rows', list(ROWS), f'Rows to time: {", ".join(ROWS)}.')
  flags.DEFINE_integer('steps', 20, 'Timed steps per side.')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps per side after compilation.')
  flags.DEFINE_bool('json', False, 'One JSON object per row.')
  app.run(main)
