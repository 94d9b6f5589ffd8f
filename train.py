r"""The training loop: the train and eval steps, `train_and_evaluate` and what it writes.

The step is `jax.pmap`-ed over all devices with `axis_name='batch'`; the TrainState is an
unmapped argument and result (`in_axes`/`out_axes` None): one array per parameter, replicated on
every device, which Orbax saves and restores as it is. Gradients and metrics are averaged with
`lax.pmean` and BatchNorm statistics are computed over the global batch. Checkpoints are written
to `workdir/checkpoints`, and a run started again with the same workdir resumes from the latest;
data order and random keys are functions of the step, so a resumed run continues exactly where
the first one stopped. main.py is the command line around it.
"""

import collections
import contextlib
import functools
import time
from typing import Callable, Optional

from absl import logging
from clu import metric_writers
import flax
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import complexity
import distillation
import input_pipeline
import models
import optimizers
import workdirs
from workdirs import TrainState

# Initialisation runs once: on the CPU, compiling it without LLVM's costly passes saves ~8 s.
CPU_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                             'xla_llvm_disable_expensive_passes': True}


class Preempted(Exception):
  """The run stopped at a preemption signal, after checkpointing its last step."""


class PhaseTimer:
  """Seconds spent in the named phases of a run ('compile', 'eval', 'checkpoint'), and laps of
  the training time outside 'eval' and 'checkpoint'."""

  def __init__(self):
    self.seconds = collections.defaultdict(float)
    self.last_lap = time.perf_counter()

  @contextlib.contextmanager
  def timed(self, phase: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[phase] += time.perf_counter() - start

  def lap(self) -> float:
    """The training seconds since the previous lap (or since this timer started)."""
    now = time.perf_counter() - self.seconds['eval'] - self.seconds['checkpoint']
    seconds, self.last_lap = now - self.last_lap, now
    return seconds


def cross_entropy(logits, labels, label_smoothing: float):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def correct_top_k(logits, labels, k: int):
  """1.0 where the label is among the k highest logits."""
  top = lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(state: TrainState, batch, teacher_variables, *, schedule, config, dropout_key,
               teacher: Optional[distillation.Teacher] = None):
  """One SGD step on this device's part of the global batch; runs under pmap('batch'). The
  images arrive as uint8 pixels (input_pipeline.train_batches) and are normalized here: a quarter
  of the bytes to send, and no float work on the host. With a `teacher` (of `teacher_variables`)
  the loss mixes in its soft targets (distillation.py)."""
  if batch['image'].dtype != jnp.uint8:
    raise TypeError(f'train_step takes uint8 pixels, as input_pipeline.train_batches gives, '
                    f'not {batch["image"].dtype}: it normalizes them itself.')
  key = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step), lax.axis_index('batch'))
  labels = batch['label'] + config.label_offset
  images = input_pipeline.normalize(batch['image'].astype(jnp.float32), config)
  if teacher is not None:
    teacher_logits = teacher.logits(teacher_variables, batch.get('teacher_image', batch['image']))

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': key})
    loss = cross_entropy(logits, labels, config.label_smoothing).mean()
    parts = {}
    if teacher is not None:
      parts = {'label_loss': loss, 'soft_loss': distillation.soft_target_loss(
          logits, teacher_logits, config.distill.temperature).mean()}
      loss = (1 - config.distill.weight) * loss + config.distill.weight * parts['soft_loss']
    return loss, (logits, updates.get('batch_stats', {}), parts)

  (loss, (logits, batch_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = lax.pmean(grads, 'batch')
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if config.ema_decay > 0:
    # TF's ExponentialMovingAverage with num_updates: the decay ramps up to ema_decay.
    decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = optax.incremental_update((new_state.params, new_state.batch_stats),
                                   (state.ema_params, state.ema_batch_stats), 1.0 - decay)
    new_state = new_state.replace(ema_params=ema[0], ema_batch_stats=ema[1])
  metrics = {'loss': loss, 'top1': correct_top_k(logits, labels, 1).mean(),
             'lr': schedule(state.step), **parts}
  return new_state, lax.pmean(metrics, 'batch')


def eval_step(state: TrainState, batch, label_offset: int = 0):
  """Sums of loss and top-1/top-5 hits over the real (mask = 1) examples of the global batch."""
  labels = batch['label'] + label_offset

  def sums(params, batch_stats, prefix):
    logits = state.apply_fn({'params': params, 'batch_stats': batch_stats}, batch['image'],
                            train=False)
    mask = batch['mask']
    return {
        f'{prefix}loss': (cross_entropy(logits, labels, 0.0) * mask).sum(),
        f'{prefix}top1': (correct_top_k(logits, labels, 1) * mask).sum(),
        f'{prefix}top5': (correct_top_k(logits, labels, min(5, logits.shape[-1])) * mask).sum(),
    }
  result = {'count': batch['mask'].sum(), **sums(state.params, state.batch_stats, '')}
  if state.ema_params is not None:
    result.update(sums(state.ema_params, state.ema_batch_stats, 'ema_'))
  return lax.psum(result, 'batch')


def evaluate(p_eval_step, state, data, config) -> dict[str, float]:
  """Loss, top-1 and top-5 (and their EMA counterparts) over the whole eval split."""
  totals = None
  for batch in input_pipeline.eval_batches(data, config):
    sums = p_eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(np.asarray, totals)  # replicated: every process reads its own copy
  count = totals.pop('count')
  return {k: float(v / count) for k, v in totals.items()} | {'count': int(count)}


def create_train_state(config, model, tx) -> TrainState:
  """A step-0 TrainState of `model` initialised from `config.seed`."""
  image = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  key = jax.random.key(config.seed)
  init = jax.jit(functools.partial(model.init, train=False)).lower(key, image)
  variables = init.compile(CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None)(
      key, image)
  return workdirs.new_train_state(model.apply, variables, tx, keep_ema=config.ema_decay > 0)


def replicated(tree, devices=None):
  """`tree` with every array replicated on `devices` (default: this process's), placed as the
  pmapped steps return their unmapped results, so that no step compiles twice."""
  mesh = jax.sharding.Mesh(np.array(devices or jax.local_devices()), ('batch',))
  return jax.device_put(jax.device_get(tree),
                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def pmapped_train_step(config, schedule, devices=None, teacher=None):
  """`train_step` pmapped over `devices` (default: all), called as (state, batch, the teacher's
  variables on the devices or None); the state unmapped and donated."""
  return jax.pmap(functools.partial(train_step, schedule=schedule, config=config, teacher=teacher,
                                    dropout_key=jax.random.key(config.seed + 1)),
                  axis_name='batch', in_axes=(None, 0, None), out_axes=(None, None),
                  donate_argnums=(0,), devices=devices)


def pmap_train_step(config, schedule, devices=None, teacher=None, teacher_variables=None):
  """`pmapped_train_step` of (state, batch); with a `teacher` (distillation.load), its variables
  placed on the devices once."""
  step = pmapped_train_step(config, schedule, devices, teacher)
  on_devices = replicated(teacher_variables, devices)
  return lambda state, batch: step(state, batch, on_devices)


def pmap_eval_step(config, devices=None):
  return jax.pmap(functools.partial(eval_step, label_offset=config.label_offset),
                  axis_name='batch', in_axes=(None, 0), out_axes=None, devices=devices)


def check_config(config) -> None:
  """Raises ValueError for the first bad setting, the model's included, before anything is
  compiled."""
  input_pipeline.check_config(config)
  optimizers.check_config(config)
  distillation.check_config(config)
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1), got {config.ema_decay}.')
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {config.label_smoothing}.')
  for field in ('log_every_steps', 'keep_checkpoints'):
    if config[field] <= 0:
      raise ValueError(f'{field} must be > 0, got {config[field]}.')
  for name in ('eval', 'checkpoint'):
    if config[f'{name}_every_steps'] <= 0 and config[f'{name}_every_epochs'] <= 0:
      raise ValueError(f'{name}_every_epochs must be > 0 (or {name}_every_steps, which '
                       f'overrides it), got {config[f"{name}_every_epochs"]}.')
  models.get_model(config)


def total_train_steps(config, steps_per_epoch: int) -> int:
  """`num_train_steps` where > 0, else `num_epochs` of `steps_per_epoch`; ValueError if none."""
  steps = config.num_train_steps
  steps = steps if steps > 0 else int(config.num_epochs * steps_per_epoch)
  if steps <= 0:
    raise ValueError(f'num_epochs={config.num_epochs} of {steps_per_epoch} steps gives no '
                     'training step: set num_epochs (or num_train_steps) > 0.')
  return steps


def interval_steps(config, name: str, steps_per_epoch: int) -> int:
  """How often (in steps) to `name` ('eval', 'checkpoint'): `{name}_every_steps` where > 0,
  else every `{name}_every_epochs` epochs, rounded to at least one step."""
  steps = config[f'{name}_every_steps']
  if steps > 0:
    return steps
  return max(round(config[f'{name}_every_epochs'] * steps_per_epoch), 1)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the latest checkpoint in `workdir` on `config`'s data (eval_only); writes
  `workdir/eval_results.json`."""
  saved = workdirs.read_config(workdir)
  workdirs.check_writable(workdir)  # for eval_results.json, before any work
  config = workdirs.with_settings(config, workdirs.settings_of(
      saved, workdirs.WEIGHT_SETTINGS + ('num_classes', 'label_offset')))
  check_config(config)
  model = models.get_model(config, axis_name='batch')
  data = input_pipeline.load(config)
  input_pipeline.check_eval_size(data, config)
  variables, step = workdirs.restore_variables(workdir)
  state = workdirs.new_train_state(model.apply, variables, optax.identity(),
                                   keep_ema=variables['ema_params'] is not None)
  result = evaluate(pmap_eval_step(config), replicated(state), data, config)
  result = {'step': step, 'dataset': config.dataset, 'split': config.eval_split,
            'image_size': config.image_size, **result}
  logging.info('eval of the checkpoint at step %d: %s', step, result)
  if jax.process_index() == 0:
    workdirs.write_json_atomic(workdirs.path_of(workdir) / 'eval_results.json', result)
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       start_time: Optional[float] = None,
                       stop_requested: Callable[[int], bool] = lambda step: False) -> dict:
  """Trains `config`'s model, evaluating and checkpointing in `workdir`; returns results.json,
  whose wall time counts from `start_time` (time.time() when the process started; this call by
  default). `stop_requested(step)`, asked after every step, checkpoints that step and raises
  Preempted where it is True (main.PreemptionSignals.reached). With `config.eval_only`, evaluates
  the latest checkpoint in `workdir` instead."""
  start_time = start_time or time.time()
  if config.eval_only:
    return evaluate_checkpoint(config, workdir)
  if config.init_from:
    config = workdirs.fine_tuning_config(config)
  check_config(config)
  workdirs.check_writable(workdir)
  config, teacher, teacher_variables = distillation.load(config)
  changes = workdirs.resume_changes(workdir, config)
  model = models.get_model(config, axis_name='batch')
  data = input_pipeline.load(config)
  input_pipeline.check_train_size(data, config)
  input_pipeline.check_eval_size(data, config)
  steps_per_epoch = input_pipeline.steps_per_epoch(data, config.batch_size)
  total_steps = total_train_steps(config, steps_per_epoch)
  eval_every = interval_steps(config, 'eval', steps_per_epoch)
  checkpoint_every = interval_steps(config, 'checkpoint', steps_per_epoch)
  manager = workdirs.checkpoint_manager(workdir, keep=config.keep_checkpoints)
  latest = manager.latest_step()
  if latest is not None and latest > total_steps:
    raise ValueError(f'{workdir} has a checkpoint at step {latest}, past the {total_steps} steps '
                     'of this config: train longer, or use a new --workdir.')
  finished = workdirs.read_results(workdir) if latest == total_steps else None
  if finished and finished['final_top1'] is not None:
    logging.info('%s finished all %d steps already; results.json is left as it is.', workdir,
                 total_steps)
    return finished

  timer = PhaseTimer()
  schedule = optimizers.create_schedule(config, steps_per_epoch, total_steps)
  with timer.timed('compile'):
    state = replicated(create_train_state(config, model,
                                          optimizers.create_optimizer(config, schedule)))
  start_step = 0
  if latest is not None:  # a checkpoint of this run, or step 0 written by convert.py
    state, start_step = workdirs.restore_latest(manager, state, workdir)
    logging.info('Resumed from the checkpoint at step %d.', start_step)
  elif config.init_from:
    source, _ = workdirs.restore_variables(config.init_from)
    state = replicated(workdirs.state_with_weights_of(state, source, config.init_from))
    logging.info('Initialised from the latest checkpoint in %s.', config.init_from)
  workdirs.write_config(workdir, config, changes, start_step)
  metrics_log = workdirs.MetricsLog(workdir, start_step)
  writer = summary_writer(config, workdir)
  if start_step == 0:
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in
                          flax.traverse_util.flatten_dict(config.to_dict(), sep='.').items()})
  p_train_step = pmap_train_step(config, schedule, teacher=teacher,
                                 teacher_variables=teacher_variables)
  p_eval_step = pmap_eval_step(config)
  evals, images_per_sec, pending = [], [], []  # pending: (step, metrics) since the last log
  last_logged = start_step
  timer.lap()  # the first lap starts here

  batches = flax.jax_utils.prefetch_to_device(
      input_pipeline.train_batches(data, config, steps_per_epoch, start_step, total_steps),
      config.prefetch_batches)
  for step in range(start_step + 1, total_steps + 1):
    compiling = step == start_step + 1  # the compile phase holds the whole first step
    with timer.timed('compile') if compiling else contextlib.nullcontext():
      state, metrics = p_train_step(state, next(batches))
      if compiling:
        jax.block_until_ready(metrics)
    pending.append((step, metrics))
    last = step == total_steps
    preempted = stop_requested(step)
    if step % config.log_every_steps == 0 or last:
      values = finite_metrics(pending, workdir)[-1]
      pending.clear()
      steps_per_sec = (step - last_logged) / max(timer.lap(), 1e-9)
      values['images_per_sec'] = steps_per_sec * config.batch_size
      images_per_sec.append(values['images_per_sec'])
      write_metrics(metrics_log, writer, step, 'train', values)
      log_progress(step, total_steps, values, steps_per_sec)
      last_logged = step
    if step % eval_every == 0 or last:
      finite_metrics(pending, workdir)
      with timer.timed('eval'):
        evals.append(evaluate(p_eval_step, state, data, config))
      write_metrics(metrics_log, writer, step, 'eval', evals[-1])
    if step % checkpoint_every == 0 or last or preempted:
      finite_metrics(pending, workdir)
      with timer.timed('checkpoint'):
        workdirs.save_train_state(manager, step, state)
    if preempted and not last:
      writer.flush()
      raise Preempted(f'Stopped by a signal after step {step}, which is checkpointed: rerun '
                      'the same command to resume.')
  batches.close()  # stops the data pipeline's threads
  if start_step == total_steps:  # the last checkpoint is there, its evaluation is not
    with timer.timed('eval'):
      evals.append(evaluate(p_eval_step, state, data, config))
    write_metrics(metrics_log, writer, total_steps, 'eval', evals[-1])
  writer.flush()

  seconds = dict(timer.seconds, wall=time.time() - start_time)
  results = run_summary(config, evals, images_per_sec, total_steps, seconds)
  if jax.process_index() == 0:
    workdirs.write_json_atomic(workdirs.path_of(workdir) / 'results.json', results)
  return results


def summary_writer(config, workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files in `workdir` (process 0, `config.tensorboard`), or no writer."""
  if jax.process_index() > 0 or not config.tensorboard:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


def write_metrics(metrics_log: workdirs.MetricsLog, writer: metric_writers.MetricWriter,
                  step: int, split: str, values: dict) -> None:
  """`values` to metrics.jsonl and TensorBoard, an evaluation's to the console too."""
  if split == 'eval':
    logging.info('eval at step %d: %s  (%d images)', step, '  '.join(
        f'{k} {v:.4f}' for k, v in values.items() if k != 'count'), values['count'])
  metrics_log.write(step, split, values)
  writer.write_scalars(step, {f'{split}/{k}': v for k, v in values.items()})


def finite_metrics(pending, workdir: str) -> list[dict[str, float]]:
  """The metrics of the `pending` (step, metrics) on the host; FloatingPointError if a loss is
  not finite, so that no checkpoint or evaluation follows a diverged step."""
  host = [(step, {k: float(v) for k, v in jax.device_get(m).items()}) for step, m in pending]
  for step, m in host:
    if not np.isfinite(m['loss']):
      raise FloatingPointError(
          f'Loss is {m["loss"]} at step {step}; stopping. The last good checkpoint in '
          f'{workdir}/checkpoints is untouched; lower learning_rate or set grad_clip_norm.')
  return [m for _, m in host]


def log_progress(step: int, total_steps: int, values: dict, steps_per_sec: float) -> None:
  eta = time.strftime('%H:%M:%S', time.gmtime((total_steps - step) / steps_per_sec))
  logging.info('step %d/%d  loss %.4f  top1 %.3f  lr %.5f  %.2f steps/s  %.0f images/s  ETA %s',
               step, total_steps, values['loss'], values['top1'], values['lr'], steps_per_sec,
               values['images_per_sec'], eta)


def run_summary(config, evals: list[dict], images_per_sec: list[float], total_steps: int,
                seconds: dict) -> dict:
  """What results.json holds: the config, complexity, final and best accuracy, speed and where
  the time went (`seconds`: 'wall' since the run started, and 'compile' (initialisation and the
  first train step), 'eval' and 'checkpoint' within it)."""
  best = max(evals, key=lambda r: r['top1']) if evals else {}
  final = evals[-1] if evals else {}
  summary = complexity.summary(config)
  return {
      'config': workdirs.config_as_dict(config),
      'macs': summary['macs'],
      'params': summary['params'],
      'steps': total_steps,
      'final_top1': final.get('top1'),
      'final_top5': final.get('top5'),
      'final_ema_top1': final.get('ema_top1'),
      'best_top1': best.get('top1'),
      'best_top5': best.get('top5'),
      'eval_count': final.get('count'),
      'train_images_per_sec': float(np.median(images_per_sec)) if images_per_sec else None,
      'wall_time_sec': seconds['wall'],
      'compile_sec': seconds.get('compile', 0.0),
      'eval_sec': seconds.get('eval', 0.0),
      'checkpoint_sec': seconds.get('checkpoint', 0.0),
  }
