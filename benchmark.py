r"""Throughput of the compiled train and eval steps on synthetic data already on the devices.

    python benchmark.py --config=configs/mobilenet_v2.py --config.batch_size=256 --steps=50 --json

Times every step after `--warmup` steps, waiting for the devices, and reports the median as
images/s for the global batch (`batch_size` for training, `eval_batch_size` for evaluation). With
a distillation teacher (`--config.distill.teacher=WORKDIR`) it times the train step with and
without the teacher and reports their ratio, the cost of distillation.
"""

import json
import statistics
import time

import malloc_tunables
import quiet_tensorflow

if __name__ == '__main__':
  malloc_tunables.restart_with_tunables()  # as main.py: before TensorFlow and JAX are imported
  quiet_tensorflow.import_tensorflow()

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

import cli
import distillation
import input_pipeline
import models
import optimizers
import train


def median_seconds(fn, steps: int, warmup: int) -> float:
  """Median wall time of `fn()` (which waits for its results) over `steps` calls after `warmup`."""
  times = []
  for call in range(warmup + steps):
    start = time.perf_counter()
    fn()
    if call >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def _median_seconds(step_fn, state, batch, steps: int, warmup: int) -> tuple[float, object]:
  """(Median wall time of `state, outputs = step_fn(state, batch)`, waiting for both; the state
  after the last call)."""
  step, final_state = stepper(step_fn, state, batch)
  return median_seconds(step, steps, warmup), final_state()


def stepper(step_fn, state, batch):
  """(A function that runs `state, outputs = step_fn(state, batch)` once and waits for both, a
  function that returns the state after the calls so far)."""
  states = [state]
  def step():
    states.append(jax.block_until_ready(step_fn(states.pop(), batch))[0])
  return step, lambda: states[-1]


def synthetic_batch(batch_size: int, config, train: bool):
  """Random images as the input pipeline gives them: uint8 pixels for training (and the
  teacher's view where its size differs), normalized float32 with a mask for evaluation."""
  devices = jax.local_device_count()
  per_device = batch_size // jax.process_count() // devices
  key = jax.random.key(0)
  def shape(size):
    return (devices, per_device, size, size, 3)
  batch = {'label': jax.random.randint(key, (devices, per_device), 0, config.num_classes)}
  if train:
    batch['image'] = jax.random.randint(key, shape(config.image_size), 0, 256).astype(jnp.uint8)
    if input_pipeline.teacher_image_size(config):
      batch['teacher_image'] = jax.random.randint(
          key, shape(input_pipeline.teacher_image_size(config)), 0, 256).astype(jnp.uint8)
  else:
    batch['image'] = jax.random.normal(key, shape(config.image_size))
    batch['mask'] = jnp.ones((devices, per_device))
  return jax.pmap(lambda x: x)(batch)  # one shard on each local device


def time_train_step(config, steps: int, warmup: int) -> tuple[float, object]:
  """(median seconds of train.py's pmapped train step on a synthetic batch, the state after)."""
  step, state = train_stepper(config)
  return median_seconds(step, steps, warmup), state()


def _train_step_inputs(config):
  """(train.py's pmapped train step of (state, batch, teacher variables), the replicated state, a
  synthetic batch, the teacher's variables on the devices)."""
  train.check_config(config)
  config, teacher, teacher_variables = distillation.load(config)
  model = models.get_model(config, axis_name='batch')
  schedule = optimizers.create_schedule(config, 1000, 100_000)
  state = train.replicated(
      train.create_train_state(config, model, optimizers.create_optimizer(config, schedule)))
  return (train.pmapped_train_step(config, schedule, teacher=teacher), state,
          synthetic_batch(config.batch_size, config, train=True),
          train.replicated(teacher_variables))


def train_stepper(config):
  """`stepper` for train.py's pmapped train step on a synthetic batch of `config`."""
  step, state, batch, teacher_variables = _train_step_inputs(config)
  return stepper(lambda state, batch: step(state, batch, teacher_variables), state, batch)


def compiled_train_step_text(config) -> str:
  """The optimized HLO of `train_stepper`'s step: the instructions that its profile names."""
  step, state, batch, teacher_variables = _train_step_inputs(config)
  return step.lower(state, batch, teacher_variables).compile().as_text()


def run(config, steps: int, warmup: int) -> dict:
  train_seconds, state = time_train_step(config, steps, warmup)
  distilled = {}
  if config.distill.teacher:
    alone = ml_collections.ConfigDict(config.to_dict())
    alone.distill.teacher = ''
    alone_seconds, _ = time_train_step(alone, steps, warmup)
    distilled = {'teacher': config.distill.teacher,
                 'train_step_ms_without_teacher': 1000 * alone_seconds,
                 'teacher_step_ratio': train_seconds / alone_seconds}
  p_eval = train.pmap_eval_step(config)
  eval_batch = synthetic_batch(config.eval_batch_size, config, train=False)
  eval_seconds, _ = _median_seconds(lambda s, b: (s, p_eval(s, b)), state, eval_batch,
                                    steps, warmup)
  return {
      'model': config.model.name,
      'alpha': config.model.alpha,
      'groups': config.model.get('groups'),
      'image_size': config.image_size,
      'half_precision': config.half_precision,
      'batch_size': config.batch_size,
      'eval_batch_size': config.eval_batch_size,
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'train_step_ms': 1000 * train_seconds,
      'eval_step_ms': 1000 * eval_seconds,
      'train_images_per_sec': config.batch_size / train_seconds,
      'eval_images_per_sec': config.eval_batch_size / eval_seconds,
      **distilled,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if flags.FLAGS.steps < 1 or flags.FLAGS.warmup < 0:
    raise app.UsageError('--steps must be at least 1 and --warmup at least 0.')
  cli.quiet_console()
  result = run(flags.FLAGS.config, flags.FLAGS.steps, flags.FLAGS.warmup)
  if flags.FLAGS.json:
    print(json.dumps(result))
  else:
    print(f'{result["device_count"]} x {result["device_kind"]}: '
          f'train {result["train_images_per_sec"]:.0f} images/s '
          f'({result["train_step_ms"]:.1f} ms/step), '
          f'eval {result["eval_images_per_sec"]:.0f} images/s ({result["eval_step_ms"]:.1f} ms/step)')
    if 'teacher_step_ratio' in result:
      print(f'with the teacher, the train step takes {result["teacher_step_ratio"]:.2f}x the '
            f'time of the same step without it ({result["train_step_ms_without_teacher"]:.1f} '
            'ms/step)')


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Model config file.', lock_config=True)
  flags.DEFINE_integer('steps', 50, 'Timed steps.')
  flags.DEFINE_integer('warmup', 5, 'Untimed steps after compilation.')
  flags.DEFINE_bool('json', False, 'Print one JSON object.')
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=cli.parse_flags)
