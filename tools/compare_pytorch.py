r"""Train-step images/s of our networks against the same networks in PyTorch eager, in one run.

    python tools/compare_pytorch.py                       # README's table: all rows
    python tools/compare_pytorch.py --rows=v2_0.5_32 --steps=50 --json
    python tools/compare_pytorch.py --rows=v1_1.0_224 --parts   # forward and one layer alone
    python tools/compare_pytorch.py --rows=v1_0.25_48 --profile # where the time goes

Each row times both sides in the same process, in `--rounds` rounds of `--steps` steps of ours
then `--steps` of PyTorch's, and reports the median of the rounds' ratios (these machines are
noisy; compare ratios, not images/s across runs). Both sides: float32,
random data already in memory, SGD with momentum 0.9 and L2 weight decay, 1000 classes, the same
batch, every host core. Ours is benchmark.py's timing of train.py's pmapped train step (uint8
images normalized in the step, the model's `conv_impl='auto'`); PyTorch's is pytorchcv's network
(the peer of tests/test_convert.py; its fixed 7x7 final pooling replaced by a global one so that
small inputs run) in channels_last memory format: forward, cross-entropy, backward and
`optimizer.step()`. A round's median step time after `--warmup` steps counts.

`--profile` adds, per row, where each side's train step spends its time: the time per step of
the operations (ours: XLA's and the oneDNN calls, from a `jax.profiler` trace, named by the source
of their HLO instruction; PyTorch's: `torch.profiler`'s self time of the aten operators) in the
forward and backward convolutions, the forward and backward BatchNorm and activations, and the
rest (head, loss, optimizer). Operations that run at the same time on different threads add up.

`--parts` adds, per row, the forward pass alone (ours: the jitted loss in training mode; PyTorch:
under `no_grad`) and the network's first stride-1 3x3 depthwise convolution alone, forward and
backward (ours: `conv_impl='auto'`'s convolution, oneDNN's through `models/onednn.py` where it
is built; PyTorch: `Conv2d(groups=C)`).

PyTorch and pytorchcv come with requirements-test.txt and requirements-peers.txt (setup.sh).
"""

import collections
import dataclasses
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import malloc_tunables  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  malloc_tunables.restart_with_tunables()  # as main.py, for both sides

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from pytorchcv.models import mobilenet, mobilenetv2, shufflenet  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import mobilenet_v1, mobilenet_v2  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import shufflenet as shufflenet_config  # pylint: disable=g-import-not-at-top,wrong-import-position
import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from models import layers  # pylint: disable=g-import-not-at-top,wrong-import-position


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


def pytorch_network(row: Row) -> torch.nn.Module:
  torch.manual_seed(0)
  model = row.peer()
  model.features.final_pool = torch.nn.AdaptiveAvgPool2d(1)
  return model.to(memory_format=torch.channels_last).train()


def alternate(ours, theirs, steps: int, warmup: int, rounds: int) -> tuple[float, float, float]:
  """(ours, theirs, theirs / ours): each side's median seconds per call over `rounds` rounds of
  `steps` calls of `ours` then `steps` of `theirs` (after `warmup` calls of each), and the median
  of the rounds' ratios, so that a slow spell of the machine touches both sides alike."""
  for _ in range(warmup):
    ours()
    theirs()
  ours_times, their_times = [], []
  for _ in range(rounds):
    ours_times.append(benchmark.median_seconds(ours, steps, 0))
    their_times.append(benchmark.median_seconds(theirs, steps, 0))
  ratios = [t / o for o, t in zip(ours_times, their_times)]
  return statistics.median(ours_times), statistics.median(their_times), statistics.median(ratios)


def pytorch_stepper(row: Row, image_size: int):
  """A function that runs one eager PyTorch training step of the row's pytorchcv network."""
  model = pytorch_network(row)
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY)
  images = torch.randn(row.batch_size, 3, image_size, image_size).to(
      memory_format=torch.channels_last)
  labels = torch.randint(0, 1000, (row.batch_size,))
  def step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
  return step


def forward_steppers(row: Row, config):
  """(ours, PyTorch's) functions that run the training-mode forward pass and loss alone."""
  model = models.get_model(config)
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(row.batch_size, config.image_size, config.image_size, 3)), jnp.float32)
  labels = jnp.zeros((row.batch_size,), jnp.int32)
  variables = model.init(jax.random.key(0), images, train=False)
  @jax.jit
  def loss(variables):
    logits, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  network = pytorch_network(row)
  torch_images = torch.randn(row.batch_size, 3, config.image_size, config.image_size).to(
      memory_format=torch.channels_last)
  torch_labels = torch.zeros(row.batch_size, dtype=torch.long)
  def forward():
    with torch.no_grad():
      torch.nn.functional.cross_entropy(network(torch_images), torch_labels)
  return lambda: jax.block_until_ready(loss(variables)), forward


def depthwise_steppers(row: Row, image_size: int):
  """(ours, PyTorch's) functions that run forward and backward of the pytorchcv network's first
  stride-1 3x3 depthwise convolution at its input shape, and that shape (N, H, W, C)."""
  network = pytorch_network(row).eval()
  shapes = {}
  def record(module, inputs, unused_output):
    shapes.setdefault(module, inputs[0].shape)
  depthwise = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)
               and m.groups == m.in_channels == m.out_channels > 1 and m.stride == (1, 1)]
  hooks = [m.register_forward_hook(record) for m in depthwise]
  with torch.no_grad():
    network(torch.randn(1, 3, image_size, image_size))
  for hook in hooks:
    hook.remove()
  _, channels, height, width = shapes[depthwise[0]]
  shape = (row.batch_size, height, width, channels)
  conv = layers.conv_module('auto')(channels, (3, 3), feature_group_count=channels)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  params = conv.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda p, x: (conv.apply(p, x) ** 2).sum(), argnums=(0, 1)))
  layer = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False).to(
      memory_format=torch.channels_last)
  xt = torch.randn(shape[0], channels, height, width).to(
      memory_format=torch.channels_last).requires_grad_()
  def forward_backward():
    xt.grad = None
    layer.zero_grad(set_to_none=True)
    (layer(xt) ** 2).sum().backward()
  return lambda: jax.block_until_ready(grad(params, x)), forward_backward, shape


PARTS = ('forward convolutions', 'forward BatchNorm and activations', 'backward convolutions',
         'backward BatchNorm and activations', 'head, loss, optimizer and the rest')
# An instruction of the optimized HLO: its name and the rest of its line (target and source op).
INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.-]+) = (.*)$', re.M)


def part(convolution: bool, in_features: bool, backward: bool) -> str:
  """The PARTS entry of an operation: a convolution's, or one in the network's feature layers (its
  BatchNorm and activations), in the forward or backward pass; otherwise the rest."""
  if not (convolution or in_features):
    return PARTS[-1]
  return PARTS[2 * backward + (not convolution)]


def our_part(hlo_line: str) -> str:
  source = re.search(r'op_name="([^"]*)"', hlo_line)
  source = source.group(1) if source else ''
  return part('custom_call_target="conv_onednn' in hlo_line or '/conv/' in source,
              '.features/' in source, 'transpose(' in source)


def pytorch_part(operator: str) -> str:
  name = operator.lower()
  return part('conv' in name, any(k in name for k in ('batch_norm', 'relu', 'threshold',
                                                          'hardtanh', 'clamp')),
              'backward' in name)


def profile_ours(config, step, steps: int, warmup: int) -> dict[str, float]:
  """Milliseconds per step in each of PARTS of `steps` calls of our train `step`, and 'step': the
  profiled calls' wall time. A first trace of `warmup` calls is left out: a process's first trace
  sets the profiler up and runs the step at half speed or less."""
  parts = {name: part_name for name, line in INSTRUCTION.findall(
      benchmark.compiled_train_step_text(config)) for part_name in [our_part(line)]}
  for calls in (warmup, steps):
    with tempfile.TemporaryDirectory() as directory:
      with jax.profiler.trace(directory):
        start = time.perf_counter()
        for _ in range(calls):
          step()
        wall = time.perf_counter() - start
      trace, = glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True)
      profile = jax.profiler.ProfileData.from_file(trace)
  nanoseconds = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        hlo_op = dict(event.stats).get('hlo_op')
        if hlo_op:
          nanoseconds[parts.get(hlo_op, PARTS[-1])] += event.duration_ns
  return {'step': 1000 * wall / steps,
          **{name: nanoseconds[name] / 1e6 / steps for name in PARTS}}


def profile_pytorch(step, steps: int, warmup: int) -> dict[str, float]:
  """Milliseconds per step in each of PARTS of `steps` calls of PyTorch's train `step` (the
  operators' self time), and 'step': the profiled calls' wall time; after a first profile of
  `warmup` calls, left out, as in `profile_ours`."""
  for calls in (warmup, steps):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
      start = time.perf_counter()
      for _ in range(calls):
        step()
      wall = time.perf_counter() - start
  microseconds = collections.Counter()
  for operator in profiler.key_averages():
    microseconds[pytorch_part(operator.key)] += operator.self_cpu_time_total
  return {'step': 1000 * wall / steps,
          **{name: microseconds[name] / 1000 / steps for name in PARTS}}


def compare(row: Row, steps: int, warmup: int, rounds: int, parts: bool, profile: bool) -> dict:
  config = our_config(row)
  ours_step, _ = benchmark.train_stepper(config)
  their_step = pytorch_stepper(row, config.image_size)
  ours, theirs, ratio = alternate(ours_step, their_step, steps, warmup, rounds)
  result = {'row': row.name, 'batch_size': row.batch_size,
            'ours_images_per_sec': row.batch_size / ours,
            'pytorch_images_per_sec': row.batch_size / theirs, 'ratio': ratio}
  if profile:  # before the parts, whose other compiled functions and networks slow its trace
    result['ours_profile_ms'] = profile_ours(config, ours_step, steps, warmup)
    result['pytorch_profile_ms'] = profile_pytorch(their_step, steps, warmup)
  if parts:
    ours_forward, pytorch_forward, _ = alternate(*forward_steppers(row, config), steps, warmup,
                                                 rounds)
    *steppers, shape = depthwise_steppers(row, config.image_size)
    ours_depthwise, pytorch_depthwise, _ = alternate(*steppers, steps, warmup, rounds)
    result.update({
        'ours_step_ms': 1000 * ours, 'pytorch_step_ms': 1000 * theirs,
        'ours_forward_ms': 1000 * ours_forward, 'pytorch_forward_ms': 1000 * pytorch_forward,
        'depthwise_shape': shape, 'ours_depthwise_ms': 1000 * ours_depthwise,
        'pytorch_depthwise_ms': 1000 * pytorch_depthwise})
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if flags.FLAGS.steps < 1 or flags.FLAGS.warmup < 0 or flags.FLAGS.rounds < 1:
    raise app.UsageError('--steps and --rounds must be at least 1 and --warmup at least 0.')
  unknown = set(flags.FLAGS.rows) - set(ROWS)
  if unknown:
    raise app.UsageError(f'Unknown rows {sorted(unknown)}; valid: {", ".join(ROWS)}.')
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; '
        f'{os.cpu_count()} CPUs', flush=True)
  if not flags.FLAGS.json:
    print('| network | batch | ours (images/s) | PyTorch eager | ours / PyTorch |\n|---|---|---|---|---|')
  for key in flags.FLAGS.rows:
    result = compare(ROWS[key], flags.FLAGS.steps, flags.FLAGS.warmup, flags.FLAGS.rounds,
                     flags.FLAGS.parts, flags.FLAGS.profile)
    if flags.FLAGS.json:
      print(json.dumps(result), flush=True)
      continue
    print(f'| {result["row"]} | {result["batch_size"]} | {result["ours_images_per_sec"]:,.1f} '
          f'| {result["pytorch_images_per_sec"]:,.1f} | {result["ratio"]:.2f}x |', flush=True)
    if flags.FLAGS.parts:
      print(f'|   step / forward only (ms) | | {result["ours_step_ms"]:.1f} / '
            f'{result["ours_forward_ms"]:.1f} | {result["pytorch_step_ms"]:.1f} / '
            f'{result["pytorch_forward_ms"]:.1f} | |\n'
            f'|   3x3 depthwise at {result["depthwise_shape"]}, forward+backward (ms) | | '
            f'{result["ours_depthwise_ms"]:.1f} | {result["pytorch_depthwise_ms"]:.1f} | |',
            flush=True)
    if flags.FLAGS.profile:
      ours_profile, pytorch_profile = result['ours_profile_ms'], result['pytorch_profile_ms']
      print(f'|   profiled step (ms) | | {ours_profile["step"]:.1f} | '
            f'{pytorch_profile["step"]:.1f} | |', flush=True)
      for name in PARTS:
        print(f'|   {name} (ms) | | {ours_profile[name]:.1f} | {pytorch_profile[name]:.1f} | |',
              flush=True)


if __name__ == '__main__':
  flags.DEFINE_list('rows', list(ROWS), f'Rows to time: {", ".join(ROWS)}.')
  flags.DEFINE_integer('steps', 10, 'Timed steps per side and round.')
  flags.DEFINE_integer('rounds', 3, 'Rounds of both sides, one after the other.')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps per side after compilation.')
  flags.DEFINE_bool('json', False, 'One JSON object per row.')
  flags.DEFINE_bool('parts', False, 'Also time the forward pass alone and a depthwise layer.')
  flags.DEFINE_bool('profile', False, "Also profile both sides' train steps by part.")
  app.run(main)
