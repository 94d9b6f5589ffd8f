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
import json
import os
import platform
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
import flax
from flax import jax_utils
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp

import complexity
import input_pipeline
import models
import optimizers

# Settings a run in an existing workdir must share with the run that wrote its checkpoints.
RESUME_KEYS = ('model', 'dataset', 'image_size', 'num_classes', 'label_offset', 'half_precision',
               'optimizer')
# Settings that belong to a checkpoint's weights: the network, what its inputs are normalized to
# and its BatchNorm epsilon. Evaluating (eval_only), fine-tuning (init_from) and predict.py take
# them from the checkpoint's config.json, so converted weights need no flags.
WEIGHT_SETTINGS = ('model.name', 'model.alpha', 'model.groups', 'model.bn_epsilon',
                   'model.shortcut_first', 'normalization_mean', 'normalization_std')
# ...and those a fine-tuning run must not change (its other settings come from the checkpoint).
ARCHITECTURE_SETTINGS = ('model.name', 'model.alpha', 'model.groups')

# XLA's CPU runtime allocates every step's temporary buffer afresh (180 MB for the quickstart's
# step) and glibc maps it from the kernel each time; faulting it in 4 KiB pages takes about a
# quarter of a CPU step. With this tunable, set at process start, glibc asks for transparent huge
# pages instead.
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
TRANSPARENT_HUGEPAGE = '/sys/kernel/mm/transparent_hugepage/enabled'

# Initialisation runs once: on the CPU, compiling it without LLVM's costly passes saves ~8 s.
CPU_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                             'xla_llvm_disable_expensive_passes': True}


class TrainState(train_state.TrainState):
  batch_stats: Any
  # Exponential moving averages of the weights and of the BatchNorm statistics (evaluated
  # together: averaged weights with the raw model's statistics mismatch early in training).
  ema_params: Any
  ema_batch_stats: Any


def cross_entropy(logits, labels, label_smoothing: float):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def correct_top_k(logits, labels, k: int):
  """1.0 where the label is among the k highest logits."""
  top = lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(state: TrainState, batch, *, schedule, config, dropout_key):
  """One SGD step on this device's part of the global batch; runs under pmap('batch')."""
  key = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step), lax.axis_index('batch'))
  labels = batch['label'] + config.label_offset

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
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
  totals = jax.device_get(jax_utils.unreplicate(totals))
  count = totals.pop('count')
  return {k: float(v / count) for k, v in totals.items()} | {'count': int(count)}


def create_train_state(config, model, tx) -> TrainState:
  image = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  key = jax.random.key(config.seed)
  init = jax.jit(functools.partial(model.init, train=False)).lower(key, image)
  variables = init.compile(CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None)(
      key, image)
  params, batch_stats = variables['params'], variables['batch_stats']
  ema = config.ema_decay > 0
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
      ema_params=params if ema else None, ema_batch_stats=batch_stats if ema else None)


def check_config(config):
  """Raises ValueError for the first bad setting, before anything is compiled."""
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] <= 0 or config[field] % devices:
      raise ValueError(f'{field}={config[field]} must be a positive multiple of the '
                       f'{devices} devices.')
  optimizers.check_config(config)
  if config.augment not in input_pipeline.AUGMENTATIONS:
    raise ValueError(f'Unknown augment {config.augment!r}; valid: '
                     f'{", ".join(input_pipeline.AUGMENTATIONS)}.')
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1), got {config.ema_decay}.')
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {config.label_smoothing}.')
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints'):
    if config[field] <= 0:
      raise ValueError(f'{field} must be > 0, got {config[field]}.')
  return models.get_model(config, axis_name='batch')


def write_json_atomic(path: str, value):
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def _check_workdir_config(workdir: str, config) -> None:
  """Stops a run whose model or data differ from those of the checkpoints already in workdir."""
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    for key in RESUME_KEYS:
      if saved.get(key) != current.get(key):
        raise ValueError(
            f'{workdir} holds a run with {key}={saved.get(key)!r}, this config has '
            f'{key}={current.get(key)!r}: use a new --workdir, or the original config to resume.')
  elif jax.process_index() == 0:
    write_json_atomic(path, current)


def read_run_config(workdir: str) -> dict:
  """The config.json that train.py or convert.py wrote in `workdir`, as a dict."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'{workdir} has no config.json: it is not a workdir of train.py or '
                     'convert.py.')
  with open(path) as f:
    return json.load(f)


def _lookup(tree: dict, field: str):
  for key in field.split('.'):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def with_settings(config: ml_collections.ConfigDict, saved: dict,
                  fields) -> ml_collections.ConfigDict:
  """A copy of `config` with the `fields` ('model.bn_epsilon', ...) that `saved` has."""
  config = ml_collections.ConfigDict(config.to_dict())
  for field in fields:
    value = _lookup(saved, field)
    if value is not None:
      *parents, last = field.split('.')
      node = functools.reduce(lambda node, key: node[key], parents, config)
      node[last] = tuple(value) if isinstance(value, list) else value
  return config


def restore_variables(workdir: str) -> tuple[dict, int]:
  """({'params', 'batch_stats', 'ema_params', 'ema_batch_stats'}, step) of the latest checkpoint
  in `workdir` (the EMA entries are None where the run kept no averages)."""
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  step = (ocp.CheckpointManager(directory).latest_step() if os.path.isdir(directory) else None)
  if step is None:
    raise ValueError(f'No checkpoint in {directory}: train there or write one with convert.py.')
  restored = ocp.CheckpointManager(directory).restore(step, args=ocp.args.StandardRestore())
  return {k: restored.get(k) for k in ('params', 'batch_stats', 'ema_params',
                                        'ema_batch_stats')}, step


def load_for_inference(workdir: str, ema: bool = False) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, {'params', 'batch_stats'}) of the latest checkpoint in `workdir`; with `ema`, the
  moving averages."""
  config = ml_collections.ConfigDict(read_run_config(workdir))
  restored, _ = restore_variables(workdir)
  prefix = 'ema_' if ema else ''
  if restored[prefix + 'params'] is None:
    raise ValueError(f'The checkpoint in {workdir} has no moving averages; leave out --ema.')
  return config, {'params': restored[prefix + 'params'],
                  'batch_stats': restored[prefix + 'batch_stats']}


def fine_tuning_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the weight settings of the checkpoint in `config.init_from`; ValueError if
  the network differs."""
  saved = read_run_config(config.init_from)
  for field in ARCHITECTURE_SETTINGS:
    ours, theirs = _lookup(config.to_dict(), field), _lookup(saved, field)
    if ours != theirs:
      raise ValueError(f'init_from={config.init_from} holds a {field}={theirs!r} network, this '
                       f'config has {field}={ours!r}: use the same network.')
  return with_settings(config, saved, WEIGHT_SETTINGS)


def initialize_from(state: TrainState, source: dict, workdir: str) -> TrainState:
  """`state` with the weights and BatchNorm statistics of `source` (restore_variables); the
  classifier keeps its fresh initialisation where its shape differs (another num_classes)."""
  ours = flax.traverse_util.flatten_dict(
      {'params': state.params, 'batch_stats': state.batch_stats}, sep='/')
  theirs = flax.traverse_util.flatten_dict(
      {'params': source['params'], 'batch_stats': source['batch_stats']}, sep='/')
  reinitialised = [k for k in ours if k.startswith('params/head/') and k in theirs
                   and np.shape(theirs[k]) != np.shape(ours[k])]
  differing = sorted(set(ours) ^ set(theirs)) + [
      k for k in ours if k in theirs and np.shape(theirs[k]) != np.shape(ours[k])
      and k not in reinitialised]
  if differing:
    raise ValueError(f'The checkpoint in init_from={workdir} does not fit this network: '
                     f'{", ".join(differing[:5])} differ.')
  if reinitialised:
    logging.info('init_from: new classifier (%s in the checkpoint, %s here).',
                 np.shape(theirs['params/head/classifier/kernel']),
                 np.shape(ours['params/head/classifier/kernel']))
  merged = flax.traverse_util.unflatten_dict(
      {k: ours[k] if k in reinitialised else jnp.asarray(theirs[k]) for k in ours}, sep='/')
  state = state.replace(**merged)
  if state.ema_params is not None:
    state = state.replace(ema_params=state.params, ema_batch_stats=state.batch_stats)
  return state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the latest checkpoint in `workdir` on `config`'s data (eval_only); writes
  `workdir/eval_results.json`."""
  saved = read_run_config(workdir)
  config = with_settings(config, saved, WEIGHT_SETTINGS + ('num_classes', 'label_offset'))
  model = check_config(config)
  data = input_pipeline.load(config)
  variables, step = restore_variables(workdir)
  state = TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=optax.identity(),
      batch_stats=variables['batch_stats'], ema_params=variables['ema_params'],
      ema_batch_stats=variables['ema_batch_stats'])
  p_eval_step = jax.pmap(functools.partial(eval_step, label_offset=config.label_offset),
                         axis_name='batch')
  result = evaluate(p_eval_step, jax_utils.replicate(state), data, config)
  result = {'step': step, 'dataset': config.dataset, 'split': config.eval_split,
            'image_size': config.image_size, **result}
  logging.info('eval of the checkpoint at step %d: %s', step, result)
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, 'eval_results.json'), result)
  return result


class MetricsLog:
  """`workdir/metrics.jsonl` (process 0 only): one JSON object per logged step and split."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.active = jax.process_index() == 0
    if self.active and os.path.exists(self.path):
      # Drop lines written after the checkpoint we resume from, so the history has no duplicates.
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= resume_step]
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(kept)
      os.replace(self.path + '.tmp', self.path)

  def write(self, step: int, split: str, values: dict):
    if self.active:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, 'split': split, **values}) + '\n')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config`'s model, evaluating and checkpointing in `workdir`; returns results.json.
  With `config.eval_only`, evaluates the latest checkpoint in `workdir` instead."""
  start_time = time.time()
  if config.eval_only:
    return evaluate_checkpoint(config, workdir)
  if config.init_from:
    config = fine_tuning_config(config)
  model = check_config(config)
  data = input_pipeline.load(config)
  steps_per_epoch = input_pipeline.steps_per_epoch(data, config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(workdir, config)

  schedule = optimizers.create_schedule(config, steps_per_epoch, total_steps)
  state = create_train_state(config, model, optimizers.create_optimizer(config, schedule))
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
  latest = manager.latest_step()
  start_step = latest or 0
  if latest is not None:  # a checkpoint of this run, or step 0 written by convert.py
    try:
      state = manager.restore(start_step, args=ocp.args.StandardRestore(state))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f'The checkpoint at step {start_step} in {workdir}/checkpoints does not fit this '
          f'TrainState ({type(e).__name__}: {str(e)[:300]}); it was written by another version '
          'of train.py. Use a new --workdir; the checkpoint is left as it is.') from e
    logging.info('Resumed from the checkpoint at step %d.', start_step)
  elif config.init_from:
    state = initialize_from(state, restore_variables(config.init_from)[0], config.init_from)
    logging.info('Initialised from the latest checkpoint in %s.', config.init_from)
  metrics_log = MetricsLog(workdir, start_step)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in
                          flax.traverse_util.flatten_dict(config.to_dict(), sep='.').items()})

  p_train_step = jax.pmap(
      functools.partial(train_step, schedule=schedule, config=config,
                        dropout_key=jax.random.key(config.seed + 1)),
      axis_name='batch', donate_argnums=(0,))
  p_eval_step = jax.pmap(functools.partial(eval_step, label_offset=config.label_offset),
                         axis_name='batch')
  state = jax_utils.replicate(state)

  pending = []  # (step, metrics on device) of the steps since the last log
  history = {'eval': [], 'images_per_sec': []}
  window_start, window_steps = time.time(), 0

  def check_finite():
    """The pending steps' metrics on the host; raises if a loss is not finite, so that no
    checkpoint or evaluation follows a diverged step."""
    host = jax.device_get([(s, jax_utils.unreplicate(m)) for s, m in pending])
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

  batches = jax_utils.prefetch_to_device(
      input_pipeline.train_batches(data, config, start_step), config.prefetch_batches)
  for step in range(start_step + 1, total_steps + 1):
    state, metrics = p_train_step(state, next(batches))
    pending.append((step, metrics))
    window_steps += 1
    last = step == total_steps
    if step % config.log_every_steps == 0 or last:
      log_train(step)
    if step % config.eval_every_steps == 0 or last:
      check_finite()
      eval_start = time.time()
      result = evaluate(p_eval_step, state, data, config)
      history['eval'].append((step, result))
      metrics_log.write(step, 'eval', result)
      writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
      logging.info('eval at step %d: %s', step, result)
      window_start += time.time() - eval_start  # throughput counts training time only
    if step % config.checkpoint_every_steps == 0 or last:
      check_finite()
      manager.save(step, args=ocp.args.StandardSave(jax.device_get(jax_utils.unreplicate(state))))
  manager.wait_until_finished()
  writer.flush()

  results = _results(config, history, total_steps, time.time() - start_time)
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, 'results.json'), results)
  return results


def _results(config, history, total_steps, wall_time) -> dict:
  evals = [r for _, r in history['eval']]
  best = max(evals, key=lambda r: r['top1']) if evals else {}
  final = evals[-1] if evals else {}
  summary = complexity.summary(config)
  return {
      'config': json.loads(config.to_json_best_effort()),
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
      'wall_time_sec': wall_time,
  }


def environ_with_huge_pages() -> Optional[dict[str, str]]:
  """The environment plus HUGE_PAGES_TUNABLE; None if glibc.malloc.hugetlb is set already (to
  anything) or this is not glibc on a kernel that gives huge pages on request."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables or platform.libc_ver()[0] != 'glibc':
    return None
  try:
    with open(TRANSPARENT_HUGEPAGE) as f:
      if '[madvise]' not in f.read():
        return None
  except OSError:
    return None
  return {**os.environ, 'GLIBC_TUNABLES': ':'.join(filter(None, [tunables, HUGE_PAGES_TUNABLE]))}


def restart_with_huge_pages() -> None:
  """Runs this command again, in place, with HUGE_PAGES_TUNABLE where it is missing and helps."""
  environ = environ_with_huge_pages()
  if environ is not None:
    os.execve(sys.executable, sys.orig_argv, environ)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  restart_with_huge_pages()
  # Orbax reports every step of every save at INFO; keep the console to this program's progress.
  logging.get_absl_handler().addFilter(lambda record: '/orbax/' not in record.pathname)
  if flags.FLAGS.distributed:
    jax.distributed.initialize()
  logging.info('JAX process %d of %d, %d local devices of %d: %s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ValueError, FloatingPointError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
  flags.DEFINE_bool('distributed', False,
                    'Call jax.distributed.initialize() first (multi-process launches).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
