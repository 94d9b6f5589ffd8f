"""A run's workdir: what train.py and convert.py write there, and how every tool reads it back.

    config.json      the run's config (written once, checked on every resume)
    checkpoints/     Orbax checkpoints of a `TrainState`, one folder per step
    metrics.jsonl    one JSON line per logged step and split (process 0)
    results.json     the summary of a finished run; eval_results.json for eval_only runs

train.py, convert.py, predict.py and sweep.py use these functions and no other path into a
workdir, so that a workdir written by one of them is read the same way by all the others.
"""

import json
import os
from typing import Any

from absl import logging
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from configs import default

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


class TrainState(train_state.TrainState):
  """What a checkpoint holds: step, parameters, optimizer state and BatchNorm statistics."""
  batch_stats: Any
  # Exponential moving averages of the weights and of the BatchNorm statistics (evaluated
  # together: averaged weights with the raw model's statistics mismatch early in training).
  ema_params: Any
  ema_batch_stats: Any


def new_train_state(apply_fn, variables: dict, tx: optax.GradientTransformation,
                    keep_ema: bool) -> TrainState:
  """A step-0 TrainState of `variables` ({'params', 'batch_stats'}, and 'ema_params' and
  'ema_batch_stats' where a checkpoint had them); with `keep_ema`, moving averages, which start
  at the weights where `variables` has none."""
  params, batch_stats = variables['params'], variables['batch_stats']
  ema_params = variables.get('ema_params') if keep_ema else None
  ema_batch_stats = variables.get('ema_batch_stats') if keep_ema else None
  if keep_ema and ema_params is None:
    ema_params, ema_batch_stats = params, batch_stats
  return TrainState.create(apply_fn=apply_fn, params=params, tx=tx, batch_stats=batch_stats,
                           ema_params=ema_params, ema_batch_stats=ema_batch_stats)


def write_json_atomic(path: str, value) -> None:
  """Writes `value` to `path` through a temporary file, so a reader never sees half a file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def config_as_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def read_config(workdir: str) -> dict:
  """The config.json that train.py or convert.py wrote in `workdir`, as a dict."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'{workdir} has no config.json: it is not a workdir of train.py or '
                     'convert.py.')
  with open(path) as f:
    return json.load(f)


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError if `workdir` holds a run whose model or data differ from `config`'s."""
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    return
  saved, current = read_config(workdir), config_as_dict(config)
  for key in RESUME_KEYS:
    if saved.get(key) != current.get(key):
      raise ValueError(
          f'{workdir} holds a run with {key}={saved.get(key)!r}, this config has '
          f'{key}={current.get(key)!r}: use a new --workdir, or the original config to resume.')


def write_config_once(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `workdir/config.json` unless the workdir has one (process 0 only)."""
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() == 0 and not os.path.exists(path):
    write_json_atomic(path, config_as_dict(config))


def settings_of(saved: dict, fields) -> dict:
  """{field: value} of those dotted `fields` that `saved` (a config.json) has."""
  values = {field: default.get_field(saved, field) for field in fields}
  return {field: value for field, value in values.items() if value is not None}


def with_settings(config: ml_collections.ConfigDict, settings: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with `settings` ({'model.bn_epsilon': 1e-3, ...}) set, fields it lacks
  added."""
  config = ml_collections.ConfigDict(config.to_dict())
  for field, value in settings.items():
    default.set_field(config, field, value, create=True)
  return config


def fine_tuning_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the weight settings of the checkpoint in `config.init_from`; ValueError if
  the network differs."""
  saved = read_config(config.init_from)
  for field in ARCHITECTURE_SETTINGS:
    ours, theirs = default.get_field(config, field), default.get_field(saved, field)
    if ours != theirs:
      raise ValueError(f'init_from={config.init_from} holds a {field}={theirs!r} network, this '
                       f'config has {field}={ours!r}: use the same network.')
  return with_settings(config, settings_of(saved, WEIGHT_SETTINGS))


def checkpoint_manager(workdir: str, keep: int = 1) -> ocp.CheckpointManager:
  """The Orbax manager of `workdir/checkpoints`, keeping the last `keep` checkpoints."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save_train_state(manager: ocp.CheckpointManager, step: int, state: TrainState) -> None:
  """Starts writing `state` (on the host or on one device) as the checkpoint of `step`."""
  manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)))


def restore_train_state(manager: ocp.CheckpointManager, step: int, state: TrainState,
                        workdir: str) -> TrainState:
  """The checkpoint at `step`, restored into the structure of `state`; ValueError (the
  checkpoint left as it is) if it does not fit."""
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(state))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f'The checkpoint at step {step} in {workdir}/checkpoints does not fit this '
        f'TrainState ({type(e).__name__}: {str(e)[:300]}); it was written by another version '
        'of train.py. Use a new --workdir; the checkpoint is left as it is.') from e


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
  config = ml_collections.ConfigDict(read_config(workdir))
  restored, _ = restore_variables(workdir)
  prefix = 'ema_' if ema else ''
  if restored[prefix + 'params'] is None:
    raise ValueError(f'The checkpoint in {workdir} has no moving averages; leave out --ema.')
  return config, {'params': restored[prefix + 'params'],
                  'batch_stats': restored[prefix + 'batch_stats']}


def state_with_weights_of(state: TrainState, source: dict, workdir: str) -> TrainState:
  """`state` with the weights and BatchNorm statistics of `source` (restore_variables of
  `workdir`); the classifier keeps its fresh initialisation where its shape differs (another
  num_classes). ValueError if any other tensor differs."""
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


class MetricsLog:
  """`workdir/metrics.jsonl` (process 0 only): one JSON object per logged step and split.

  Opening it for a run that resumes at `resume_step` drops the lines written after that step's
  checkpoint, so the history of a resumed run has no duplicates."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.active = jax.process_index() == 0
    if self.active and os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= resume_step]
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(kept)
      os.replace(self.path + '.tmp', self.path)

  def write(self, step: int, split: str, values: dict):
    if self.active:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, 'split': split, **values}) + '\n')
