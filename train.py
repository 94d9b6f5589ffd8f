r"""Data-parallel training and evaluation.

    python train.py --config=configs/mobilenet_v2.py:alpha=0.5 --workdir=runs/v2_0.5

The same command runs on one CPU, one GPU, every GPU of a machine and every host of a TPU slice
(add --distributed on multi-process launches). The train step is `jax.pmap`-ed over all local
devices with `axis_name='batch'`: gradients and metrics are averaged with `lax.pmean` and BatchNorm
statistics are computed over the global batch. Checkpoints are written to `workdir/checkpoints`
and a run started again with the same workdir resumes from the latest one; data order and random
keys are functions of the step, so a resumed run continues exactly where the first one stopped.
"""

import functools
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

import hugepages
import quiet_tensorflow

PROCESS_START = time.time()
if __name__ == '__main__':
  # Before TensorFlow and JAX are imported (the imports below come after this on purpose): the
  # restart runs this file again from the start, and they load and greet once.
  hugepages.restart_with_huge_pages()
  quiet_tensorflow.import_tensorflow()  # without its doubled oneDNN banner on stderr

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
import flax
from flax import jax_utils
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from configs import default
import complexity
import input_pipeline
import models
import optimizers
import workdirs
from workdirs import TrainState

# The exit status of a run stopped by SIGTERM or SIGINT after checkpointing (sysexits' EX_TEMPFAIL:
# "try again"): rerunning the same command resumes it.
PREEMPTED_EXIT_STATUS = 75

# Initialisation runs once: on the CPU, compiling it without LLVM's costly passes saves ~8 s.
CPU_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                             'xla_llvm_disable_expensive_passes': True}


class Preempted(Exception):
  """The run stopped at a preemption signal, after checkpointing its last step."""


class PreemptionSignals:
  """Within `with`, SIGTERM (what Cloud TPU and SLURM send before they stop a job) and SIGINT ask
  the training loop to checkpoint the step it is at and stop; a second signal stops at once.

  In a multi-process run JAX's preemption service catches SIGTERM and every process stops at
  the same step (`reached_preemption_sync_point`)."""

  def __init__(self):
    self.requested = False
    self.multi_process = jax.process_count() > 1
    self.signals = [signal.SIGINT] if self.multi_process else [signal.SIGTERM, signal.SIGINT]

  def __enter__(self):
    # Python takes signals in the main thread only; elsewhere (a caller's worker thread) the
    # process keeps its own handling.
    in_main_thread = threading.current_thread() is threading.main_thread()
    self.previous = {s: signal.signal(s, self._handle) for s in self.signals if in_main_thread}
    return self

  def __exit__(self, *exc_info):
    for s, handler in self.previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # the second signal: stop now, as without this handler
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.requested = True
    logging.warning('%s: checkpointing this step, then stopping (send it again to stop now).',
                    signal.Signals(signum).name)

  def reached(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop; call once per step."""
    if self.multi_process and multihost_utils.reached_preemption_sync_point(step):
      return True
    return self.requested


def cross_entropy(logits, labels, label_smoothing: float):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def correct_top_k(logits, labels, k: int):
  """1.0 where the label is among the k highest logits."""
  top = lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(state: TrainState, batch, *, schedule, config, dropout_key):
  """One SGD step on this device's part of the global batch; runs under pmap('batch'). The
  images arrive as uint8 pixels (input_pipeline.train_batches) and are normalized here: a quarter
  of the bytes to send, and no float work on the host."""
  if batch['image'].dtype != jnp.uint8:
    raise TypeError(f'train_step takes uint8 pixels, as input_pipeline.train_batches gives, '
                    f'not {batch["image"].dtype}: it normalizes them itself.')
  key = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step), lax.axis_index('batch'))
  labels = batch['label'] + config.label_offset
  images = input_pipeline.normalize(batch['image'].astype(jnp.float32), config)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': key})
    loss = cross_entropy(logits, labels, config.label_smoothing).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, 'batch')
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if config.ema_decay > 0:
    # TF's ExponentialMovingAverage with num_updates: the decay ramps up to ema_decay.
    decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = optax.incremental_update((new_state.params, new_state.batch_stats),
                                   (state.ema_params, state.ema_batch_stats), 1.0 - decay)
    new_state = new_state.replace(ema_params=ema[0], ema_batch_stats=ema[1])
  metrics = {
      'loss': loss,
      'top1': correct_top_k(logits, labels, 1).mean(),
      'lr': schedule(state.step),
  }
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
  totals = None
  for batch in input_pipeline.eval_batches(data, config):
    sums = p_eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = first_replica_on_host(totals)
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


def first_replica_on_host(tree):
  """The first local device's copy of every array of `tree` (replicated by pmap) as a NumPy
  array, read without a collective: `x[0]` and `flax.jax_utils.unreplicate` gather whole arrays
  across processes."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def global_replicated(tree):
  """`tree` (replicated by pmap over each process's devices, leading axis = local devices) as
  global arrays of the unreplicated shape replicated over all devices, which Orbax saves from
  several processes together (written once, by process 0).

  Orbax's `fully_replicated_host_local_array_to_global_array` is not used: it takes the global
  shape from the first shard, which keeps the device axis (1, ...) under current JAX, and removes
  that axis only where there are several local devices, so with one device it saved every array
  with a leading 1."""
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ('replica',)),
                                        jax.sharding.PartitionSpec())
  def to_global(x):
    shape = x.shape[1:]
    return jax.make_array_from_single_device_arrays(
        shape, sharding, [shard.data.reshape(shape) for shard in x.addressable_shards])
  return jax.tree.map(to_global, tree)


def replicate(tree):
  """`tree` on every local device, placed as the pmapped steps return their outputs (on a mesh
  axis named 'batch'), so that the train step compiles once and not again for its own output."""
  return jax.pmap(lambda x: x, axis_name='batch')(jax_utils.replicate(tree))


def pmap_train_step(config, schedule, devices=None):
  """`train_step` pmapped over the local devices (or `devices`), donating the old state."""
  return jax.pmap(functools.partial(train_step, schedule=schedule, config=config,
                                    dropout_key=jax.random.key(config.seed + 1)),
                  axis_name='batch', donate_argnums=(0,), devices=devices)


def pmap_eval_step(config, devices=None):
  return jax.pmap(functools.partial(eval_step, label_offset=config.label_offset),
                  axis_name='batch', devices=devices)


def check_config(config) -> None:
  """Raises ValueError for the first bad setting, the model's included, before anything is
  compiled."""
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] <= 0 or config[field] % devices:
      raise ValueError(f'{field}={config[field]} must be a positive multiple of the '
                       f'{devices} devices.')
  optimizers.check_config(config)
  if config.augment not in input_pipeline.AUGMENTATIONS:
    raise ValueError(f'Unknown augment {config.augment!r}; valid: '
                     f'{", ".join(input_pipeline.AUGMENTATIONS)}.')
  if config.train_resize_method not in input_pipeline.TRAIN_RESIZE_METHODS:
    raise ValueError(f'Unknown train_resize_method {config.train_resize_method!r}; valid: '
                     f'{", ".join(input_pipeline.TRAIN_RESIZE_METHODS)}.')
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
  result = evaluate(pmap_eval_step(config), replicate(state), data, config)
  result = {'step': step, 'dataset': config.dataset, 'split': config.eval_split,
            'image_size': config.image_size, **result}
  logging.info('eval of the checkpoint at step %d: %s', step, result)
  if jax.process_index() == 0:
    workdirs.write_json_atomic(workdirs.path_of(workdir) / 'eval_results.json', result)
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       start_time: Optional[float] = None) -> dict:
  """Trains `config`'s model, evaluating and checkpointing in `workdir`; returns results.json,
  whose wall time counts from `start_time` (time.time() when the process started; this call by
  default). With `config.eval_only`, evaluates the latest checkpoint in `workdir` instead."""
  start_time = start_time or time.time()
  if config.eval_only:
    return evaluate_checkpoint(config, workdir)
  if config.init_from:
    config = workdirs.fine_tuning_config(config)
  check_config(config)
  workdirs.check_writable(workdir)
  changes = workdirs.resume_changes(workdir, config)
  model = models.get_model(config, axis_name='batch')
  data = input_pipeline.load(config)
  input_pipeline.check_train_size(data, config)
  input_pipeline.check_eval_size(data, config)
  steps_per_epoch = input_pipeline.steps_per_epoch(data, config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  if total_steps <= 0:
    raise ValueError(f'num_epochs={config.num_epochs} of {steps_per_epoch} steps gives no '
                     'training step: set num_epochs (or num_train_steps) > 0.')
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

  schedule = optimizers.create_schedule(config, steps_per_epoch, total_steps)
  init_start = time.time()
  state = create_train_state(config, model, optimizers.create_optimizer(config, schedule))
  seconds = {'compile': time.time() - init_start, 'eval': 0.0, 'checkpoint': 0.0}
  start_step = 0
  if latest is not None:  # a checkpoint of this run, or step 0 written by convert.py
    state, start_step = workdirs.restore_latest(manager, state, workdir)
    logging.info('Resumed from the checkpoint at step %d.', start_step)
  elif config.init_from:
    source, _ = workdirs.restore_variables(config.init_from)
    state = workdirs.state_with_weights_of(state, source, config.init_from)
    logging.info('Initialised from the latest checkpoint in %s.', config.init_from)
  workdirs.write_config(workdir, config, changes, start_step)
  metrics_log = workdirs.MetricsLog(workdir, start_step)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0 or not config.tensorboard)
  if start_step == 0:
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in
                          flax.traverse_util.flatten_dict(config.to_dict(), sep='.').items()})

  p_train_step = pmap_train_step(config, schedule)
  p_eval_step = pmap_eval_step(config)
  state = replicate(state)

  pending = []  # (step, metrics on device) of the steps since the last log
  history = {'eval': [], 'images_per_sec': []}
  window_start, window_steps = time.time(), 0

  def check_finite():
    """The pending steps' metrics on the host; raises if a loss is not finite, so that no
    checkpoint or evaluation follows a diverged step."""
    host = [(s, first_replica_on_host(m)) for s, m in pending]
    for s, m in host:
      if not np.isfinite(m['loss']):
        raise FloatingPointError(
            f'Loss is {m["loss"]} at step {s}; stopping. The last good checkpoint in '
            f'{workdir}/checkpoints is untouched; lower learning_rate or set grad_clip_norm.')
    return host

  def log_train(step):
    nonlocal window_start, window_steps
    values = {k: float(v) for k, v in check_finite()[-1][1].items()}
    pending.clear()
    elapsed = time.time() - window_start
    values['images_per_sec'] = window_steps * config.batch_size / max(elapsed, 1e-9)
    history['images_per_sec'].append(values['images_per_sec'])
    metrics_log.write(step, 'train', values)
    writer.write_scalars(step, {f'train/{k}': v for k, v in values.items()})
    eta = (total_steps - step) * elapsed / max(window_steps, 1)
    logging.info('step %d/%d  loss %.4f  top1 %.3f  lr %.5f  %.2f steps/s  %.0f images/s  ETA %s',
                 step, total_steps, values['loss'], values['top1'], values['lr'],
                 window_steps / max(elapsed, 1e-9), values['images_per_sec'],
                 time.strftime('%H:%M:%S', time.gmtime(eta)))
    window_start, window_steps = time.time(), 0

  def run_eval(step):
    nonlocal window_start
    check_finite()
    eval_start = time.time()
    result = evaluate(p_eval_step, state, data, config)
    history['eval'].append((step, result))
    metrics_log.write(step, 'eval', result)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
    logging.info('eval at step %d: %s', step, result)
    seconds['eval'] += time.time() - eval_start
    window_start += time.time() - eval_start  # throughput counts training time only

  def save_checkpoint(step):
    nonlocal window_start
    check_finite()
    save_start = time.time()
    workdirs.save_train_state(manager, step, global_replicated(state))
    seconds['checkpoint'] += time.time() - save_start
    window_start += time.time() - save_start

  batches = jax_utils.prefetch_to_device(
      input_pipeline.train_batches(data, config, steps_per_epoch, start_step, total_steps),
      config.prefetch_batches)
  with PreemptionSignals() as preemption:
    for step in range(start_step + 1, total_steps + 1):
      step_start = time.time()
      state, metrics = p_train_step(state, next(batches))
      if step == start_step + 1:  # the step compiles
        jax.block_until_ready(metrics)
        seconds['compile'] += time.time() - step_start
      pending.append((step, metrics))
      window_steps += 1
      last = step == total_steps
      preempted = preemption.reached(step)
      if step % config.log_every_steps == 0 or last:
        log_train(step)
      if step % eval_every == 0 or last:
        run_eval(step)
      if step % checkpoint_every == 0 or last or preempted:
        save_checkpoint(step)
      if preempted and not last:
        writer.flush()
        raise Preempted(f'Stopped by a signal after step {step}, which is checkpointed: rerun '
                        'the same command to resume.')
  batches.close()  # stops the data pipeline's threads
  if start_step == total_steps:  # the last checkpoint is there, its evaluation is not
    run_eval(total_steps)
  writer.flush()

  seconds['wall'] = time.time() - start_time
  results = run_summary(config, history, total_steps, seconds)
  if jax.process_index() == 0:
    workdirs.write_json_atomic(workdirs.path_of(workdir) / 'results.json', results)
  return results


def run_summary(config, history, total_steps, seconds) -> dict:
  """What results.json holds: the config, complexity, final and best accuracy, speed and where
  the time went (`seconds`: 'wall' since the run started, and 'compile' (initialisation and the
  first train step), 'eval' and 'checkpoint' within it)."""
  evals = [r for _, r in history['eval']]
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
      'train_images_per_sec': (float(np.median(history['images_per_sec']))
                               if history['images_per_sec'] else None),
      'wall_time_sec': seconds['wall'],
      'compile_sec': seconds['compile'],
      'eval_sec': seconds['eval'],
      'checkpoint_sec': seconds['checkpoint'],
  }


def keep_on_console(record) -> bool:
  """False for what would bury this program's progress and errors: Orbax's report of every step
  of every save, asyncio's of the writes left over from a failed one, JAX's probe for a TPU."""
  return not ('/orbax/' in record.pathname or record.name == 'asyncio'
              or "Unable to initialize backend 'tpu'" in record.getMessage())


def initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                           process_id: Optional[int], initialization_timeout: int,
                           heartbeat_timeout: int) -> None:
  """Joins this process to a multi-process run (`jax.distributed.initialize`): with the three
  launch settings given, or with none (Cloud TPU, SLURM and Open MPI provide them). ValueError
  for a partial or inconsistent launch, or a coordinator not reached within
  `initialization_timeout` seconds. Once running, every process stops (exit status 134, "the
  JAX distributed service detected fatal errors") within `heartbeat_timeout` seconds of the death
  of another."""
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if any(v is None for v in given.values()) and any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    raise ValueError(f'--distributed needs all of --coordinator_address, --num_processes and '
                     f'--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                     f'JAX_PROCESS_ID), or none of them on Cloud TPU and SLURM; '
                     f'{", ".join(missing)} missing.')
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'process_id={process_id} must be in [0, num_processes={num_processes}).')
  if coordinator_address is not None and process_id > 0:
    # JAX aborts the process (no exception) when the coordinator does not answer in time.
    wait_for_coordinator(coordinator_address, initialization_timeout)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout)


def wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once something accepts connections at `address` (host:port); ValueError naming it
  after `timeout` seconds."""
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'coordinator_address={address!r} must be host:port.')
  deadline = time.time() + timeout
  while True:
    try:
      socket.create_connection((host.strip('[]'), int(port)), timeout=1).close()
      return
    except OSError as e:
      if time.time() > deadline:
        raise ValueError(
            f'This process could not join the run coordinated at {address} within {timeout} s '
            f'({e.strerror or e}): start process 0 there first, or check the address, port and '
            'firewall (--coordinator_address, --initialization_timeout).') from None
      time.sleep(0.5)


def check_same_launch(config: ml_collections.ConfigDict, workdir: str) -> None:
  """ValueError on every process unless all processes of a multi-process run were given the
  same config and workdir (otherwise they would wait for each other's checkpoints for ever)."""
  launch = json.dumps([workdirs.config_as_dict(config), workdir], sort_keys=True)
  digest = np.frombuffer(hashlib.sha256(launch.encode()).digest(), np.uint8)
  digests = multihost_utils.process_allgather(digest)
  differing = [i for i, d in enumerate(digests) if not np.array_equal(d, digests[0])]
  if differing:
    raise ValueError(f'Process(es) {differing} were started with another config or --workdir '
                     'than process 0: start every process with the same command.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(keep_on_console)
  try:
    if flags.FLAGS.distributed:
      initialize_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                             flags.FLAGS.process_id, flags.FLAGS.initialization_timeout,
                             flags.FLAGS.heartbeat_timeout)
    if jax.process_count() > 1:
      check_same_launch(flags.FLAGS.config, flags.FLAGS.workdir)
    logging.info('JAX process %d of %d, %d local devices of %d: %s', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].device_kind)
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, start_time=PROCESS_START)
  except Preempted as e:
    logging.warning('%s', e)
    sys.exit(PREEMPTED_EXIT_STATUS)
  except (ValueError, FloatingPointError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
  flags.DEFINE_bool('distributed', False,
                    'Join a multi-process run (jax.distributed.initialize) before anything else.')
  flags.DEFINE_string('coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
                      'With --distributed: host:port of process 0, the same on every process '
                      '(default: $JAX_COORDINATOR_ADDRESS; not needed on Cloud TPU and SLURM).')
  flags.DEFINE_integer('num_processes', os.environ.get('JAX_NUM_PROCESSES'),
                       'With --distributed: how many processes (default: $JAX_NUM_PROCESSES).')
  flags.DEFINE_integer('process_id', os.environ.get('JAX_PROCESS_ID'),
                       'With --distributed: this process, 0 to num_processes - 1 (default: '
                       '$JAX_PROCESS_ID).')
  flags.DEFINE_integer('initialization_timeout', 300,
                       'With --distributed: seconds to wait for the coordinator and the other '
                       'processes at start-up before stopping with an error.')
  flags.DEFINE_integer('heartbeat_timeout', 100,
                       'With --distributed: seconds after which the other processes stop when '
                       'one has died (a killed host, an out-of-memory kill).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=default.parse_flags)
