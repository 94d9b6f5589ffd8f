"""A run's workdir: what main.py and convert.py write there, and how every tool reads it back.

    config.json          the run's config (checked on every resume, rewritten when it may change)
    config_changes.jsonl the settings a resumed run changed, at the step it resumed from
    checkpoints/         Orbax checkpoints of a `TrainState`, one folder per step
    damaged_checkpoints/ checkpoints that failed to restore, moved aside (never deleted)
    metrics.jsonl        one JSON line per logged step and split (process 0)
    results.json         the summary of a finished run; eval_results.json for eval_only runs

main.py, convert.py, predict.py and sweep.py use these functions and no other path into a
workdir, so that a workdir written by one of them is read the same way by all the others.

A workdir is a local directory or a Cloud Storage (gs://) folder: every access goes through
`etils.epath` (which Orbax uses too; for gs:// it uses TensorFlow's GCS client where TensorFlow is
installed, or gcsfs with EPATH_USE_TF=false). Object storage has neither appends nor atomic
renames, but a single object upload is all-or-nothing: a reader sees the old object or the new
one. So files are written whole, in one upload (`write_atomic`), never appended to: the metrics
log is rewritten whole at every log step (small: one line per logged step).
"""

import json
import os
import time
from typing import Any, Optional

from absl import logging
from etils import epath
import flax
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from configs import default

# The settings a resumed run may change: how long it trains, what it logs, evaluates and keeps,
# and where the data are. Every other setting decides the training trajectory (the data order, the
# schedule, the network) and must stay as the checkpoints' run had it.
RESUME_MAY_CHANGE = ('num_epochs', 'num_train_steps', 'log_every_steps', 'tensorboard',
                     'eval_every_epochs', 'eval_every_steps', 'checkpoint_every_epochs',
                     'checkpoint_every_steps', 'keep_checkpoints', 'eval_batch_size', 'eval_split',
                     'prefetch_batches', 'data_threads', 'data_dir', 'download',
                     'fashion_mnist_files', 'init_from')
# Settings main.py fills in at the start of a run where a config leaves them at these values
# (distillation.load); a config that leaves them so does not differ from the run that filled them.
FILLED_AT_START = {'distill.teacher_image_size': 0, 'distill.teacher_checksum': ''}
# Settings that belong to a checkpoint's weights: the network, what its inputs are normalized to
# and its BatchNorm epsilon. Evaluating (eval_only), fine-tuning (init_from) and predict.py take
# them from the checkpoint's config.json, so converted weights need no flags.
WEIGHT_SETTINGS = ('model.name', 'model.alpha', 'model.groups', 'model.bn_epsilon',
                   'model.shortcut_first', 'normalization_mean', 'normalization_std',
                   *default.ABLATION_FIELDS)
# ...and those a fine-tuning run must not change (its other settings come from the checkpoint).
ARCHITECTURE_SETTINGS = ('model.name', 'model.alpha', 'model.groups', *default.ABLATION_FIELDS)


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
  # A network without BatchNorm (SqueezeNet) has no statistics: an empty collection.
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  ema_params = variables.get('ema_params') if keep_ema else None
  ema_batch_stats = variables.get('ema_batch_stats') if keep_ema else None
  if keep_ema and ema_params is None:
    ema_params, ema_batch_stats = params, batch_stats
  return TrainState.create(apply_fn=apply_fn, params=params, tx=tx, batch_stats=batch_stats,
                           ema_params=ema_params, ema_batch_stats=ema_batch_stats)


def is_local(path) -> bool:
  """False for object storage paths (gs://, s3://)."""
  return '://' not in os.fspath(path)


def path_of(workdir) -> epath.Path:
  """`workdir` as an epath.Path: absolute where it is local (Orbax needs that)."""
  return epath.Path(os.path.abspath(workdir) if is_local(workdir) else workdir)


def write_atomic(path, content: str | bytes) -> None:
  """Writes `content` (text or bytes) to `path` so that a reader never sees half a file: through
  a temporary file renamed into place on a local disk, in one upload on object storage."""
  path = epath.Path(path)
  write = epath.Path.write_bytes if isinstance(content, bytes) else epath.Path.write_text
  if not is_local(path):
    write(path, content)
    return
  tmp = path.parent / f'{path.name}.tmp'
  write(tmp, content)
  os.replace(tmp, path)


def write_json_atomic(path: str, value) -> None:
  write_atomic(path, json.dumps(value, indent=2))


def config_as_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def read_config(workdir: str, fields=None) -> dict:
  """The config.json that main.py or convert.py wrote in `workdir`, as a dict; ValueError if it
  lacks any of the top-level `fields` (default: every setting of this version)."""
  path = path_of(workdir) / 'config.json'
  if not path.is_file():
    raise ValueError(f'{workdir} has no config.json: it is not a workdir of main.py or '
                     'convert.py.')
  saved = json.loads(path.read_text())
  model = saved.get('model', {})
  missing = sorted(set(fields or default.get_config()) - set(saved)) + [
      f'model.{field}' for field in default.ABLATIONS.get(model.get('name'), {})
      if field not in model]
  if missing:
    raise ValueError(f'{path} was written by an earlier version of this project: it has no '
                     f'{", ".join(missing)}. Train again in a new --workdir, or use the version '
                     'that wrote it (git log) to resume or read it.')
  return saved


def read_results(workdir: str):
  """The results.json of a finished run in `workdir`, or None."""
  path = path_of(workdir) / 'results.json'
  return json.loads(path.read_text()) if path.exists() else None


def _unreachable(workdir: str, action: str, error: Exception) -> ValueError:
  """The one-line error of a `workdir` that cannot be read or written (`action`)."""
  reason = getattr(error, 'strerror', None) or str(error).splitlines()[0][:300]
  hint = ('check the bucket name, the network and the credentials (gcloud auth '
          'application-default login)' if not is_local(workdir) else 'choose a writable '
          'directory')
  return ValueError(f'Cannot {action} --workdir={workdir} ({reason}): {hint}.')


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed; ValueError if a file cannot be written there (on gs://: no
  network or no credentials), before any work."""
  probe = path_of(workdir) / f'.write_test.{os.getpid()}'
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  # OSError; cloud clients raise others
    raise _unreachable(workdir, 'write to', e) from None


def check_readable(workdir: str) -> None:
  """ValueError if `workdir` cannot be looked up (on gs://: no network or no credentials); one
  that does not exist yet is readable."""
  try:
    path_of(workdir).exists()
  except Exception as e:  # pylint: disable=broad-except  # cloud clients raise many kinds
    raise _unreachable(workdir, 'read', e) from None


def config_differences(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """{field: [saved, current]} of every dotted field in which `config` differs from the
  config.json of `workdir` ({} where there is none)."""
  if not (path_of(workdir) / 'config.json').exists():
    return {}
  saved = flax.traverse_util.flatten_dict(read_config(workdir), sep='.')
  current = flax.traverse_util.flatten_dict(config_as_dict(config), sep='.')
  return {k: [saved.get(k), current.get(k)] for k in sorted(saved.keys() | current.keys())
          if saved.get(k) != current.get(k)
          and not (k in FILLED_AT_START and current.get(k) == FILLED_AT_START[k])}


def resume_changes(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """{field: [saved, current]} of the settings in RESUME_MAY_CHANGE that `config` changes from
  the run in `workdir` ({} for a new workdir), and the path of a distillation teacher whose
  weights are the same; ValueError naming the first other change."""
  changes = config_differences(workdir, config)
  for field, (old, new) in changes.items():
    if field == 'distill.teacher' and old and new:
      continue  # the teacher moved: its checksum decides whether it is the same
    if field == 'distill.teacher_checksum' and old and new:
      raise ValueError(f'The weights of the teacher distill.teacher={config.distill.teacher} '
                       f'(checksum {new}) are not those the run in {workdir} started with '
                       f'({old}): give it that teacher, or use a new --workdir.')
    if field not in RESUME_MAY_CHANGE:
      raise ValueError(
          f'{workdir} holds a run with {field}={old!r}, this config has {field}={new!r}: use a '
          'new --workdir, or the original config to resume (a resumed run may change only '
          f'{", ".join(RESUME_MAY_CHANGE)}).')
  return changes


def write_config(workdir: str, config: ml_collections.ConfigDict, changes: dict,
                 step: int) -> None:
  """Writes `workdir/config.json` and, for a run resumed at `step` with `changes`, appends them
  to config_changes.jsonl (process 0 only)."""
  if jax.process_index() > 0:
    return
  if changes:
    logging.warning('Resuming at step %d with changed settings: %s', step, changes)
    log = path_of(workdir) / 'config_changes.jsonl'
    earlier = log.read_text() if log.exists() else ''
    write_atomic(log, earlier + json.dumps({'step': step, 'changes': changes}) + '\n')
  write_json_atomic(path_of(workdir) / 'config.json', config_as_dict(config))


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
  """The Orbax manager of `workdir/checkpoints`, keeping the last `keep` checkpoints. It writes
  synchronously (a few MB for these networks), so that a failed write stops the run at once."""
  return ocp.CheckpointManager(
      path_of(workdir) / 'checkpoints',
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False))


def save_train_state(manager: ocp.CheckpointManager, step: int, state: TrainState) -> None:
  """Writes `state` as the checkpoint of `step`, called by every process together; `state` is on
  the host or replicated on this process's devices (train.replicated). ValueError if the write
  fails, which leaves the earlier checkpoints intact."""
  # One copy on the host (every process holds the same, and Orbax writes it from process 0): a
  # replicated device array made Orbax compile a slice per shape, hundreds of compilations
  # (about 8 s) at the first checkpoint of every process.
  state = jax.device_get(state)
  try:
    manager.save(step, args=ocp.args.StandardSave(state))
  except Exception as e:  # pylint: disable=broad-except  # whatever the write raised
    raise ValueError(
        f'Writing the checkpoint of step {step} in {manager.directory} failed '
        f'({type(e).__name__}: {str(e).splitlines()[0][:200]}); the checkpoints before '
        'it are intact. Free space and rerun the same command to resume.') from e


def restore_latest(manager: ocp.CheckpointManager, state: TrainState,
                   workdir: str) -> tuple[TrainState, int]:
  """(the newest checkpoint that restores into the structure of `state`, its step). Newer ones
  that fail (damaged by a crash or a full disk) are moved to `workdir/damaged_checkpoints/`
  with a warning; ValueError, and nothing moved, if none restores."""
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(state))
    except Exception as e:  # pylint: disable=broad-except  # Orbax and TensorStore raise many kinds
      failures.append((step, f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'))
      continue
    if failures and jax.process_index() == 0:
      damaged = path_of(workdir) / 'damaged_checkpoints'
      damaged.mkdir(parents=True, exist_ok=True)
      for bad_step, error in failures:
        target = damaged / f'{bad_step}.{int(time.time())}'
        (epath.Path(manager.directory) / str(bad_step)).rename(target)
        logging.warning('The checkpoint at step %d does not restore (%s); moved it to %s and '
                        'resumed from step %d.', bad_step, error, target, step)
    if failures:
      if jax.process_count() > 1:  # the other processes wait for process 0's moves
        multihost_utils.sync_global_devices('damaged checkpoints moved')
      manager.reload()
    return restored, step
  step, error = failures[0]
  raise ValueError(
      f'No checkpoint in {workdir}/checkpoints restores into this TrainState (step {step}: '
      f'{error}); it is damaged or was written by another version of train.py. Use a new '
      '--workdir; the checkpoints are left as they are.')


def restore_on_host(workdir: str, step: Optional[int] = None) -> tuple[dict, int]:
  """(the checkpoint of `step` (default: the latest) in `workdir` as a dict of NumPy arrays, its
  step), whatever devices and processes wrote it (Orbax restores onto the writers' devices by
  default, which fails on any other topology)."""
  directory = path_of(workdir) / 'checkpoints'
  manager = (ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
             if directory.is_dir() else None)
  if step is None:
    step = manager.latest_step() if manager else None
  if step is None:
    raise ValueError(f'No checkpoint in {directory}: train there or write one with convert.py.')
  on_this_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_this_device),
                        manager.item_metadata(step))
  return jax.device_get(manager.restore(step, args=ocp.args.StandardRestore(target))), step


def restore_variables(workdir: str) -> tuple[dict, int]:
  """({'params', 'batch_stats', 'ema_params', 'ema_batch_stats'}, step) of the latest checkpoint
  in `workdir` (the EMA entries are None where the run kept no averages)."""
  restored, step = restore_on_host(workdir)
  return {k: restored.get(k) for k in ('params', 'batch_stats', 'ema_params',
                                        'ema_batch_stats')}, step


def checkpoint_weights(workdir: str, ema: bool = False) -> Optional[dict]:
  """{'params', 'batch_stats'} of the latest checkpoint in `workdir` as NumPy arrays; with `ema`,
  its moving averages, or None where the run kept none."""
  restored, _ = restore_variables(workdir)
  prefix = 'ema_' if ema else ''
  if restored[prefix + 'params'] is None:
    return None
  return {'params': restored[prefix + 'params'], 'batch_stats': restored[prefix + 'batch_stats']}


def load_for_inference(workdir: str, ema: bool = False) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, {'params', 'batch_stats'}) of the latest checkpoint in `workdir`; with `ema`, the
  moving averages."""
  config = ml_collections.ConfigDict(read_config(workdir))
  weights = checkpoint_weights(workdir, ema)
  if weights is None:
    raise ValueError(f'The checkpoint in {workdir} has no moving averages; leave out --ema.')
  return config, weights


def differing_shapes(ours: dict, theirs: dict) -> list[str]:
  """The sorted '/'-joined paths of the arrays whose shapes differ between two variable trees,
  or that only one of them has."""
  ours, theirs = (flax.traverse_util.flatten_dict(jax.tree.map(np.shape, tree), sep='/')
                  for tree in (ours, theirs))
  return sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))


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
  differing = [k for k in differing_shapes(ours, theirs) if k not in reinitialised]
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


def _json_or_none(line: str):
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None


class MetricsLog:
  """`workdir/metrics.jsonl` (process 0 only): one JSON object per logged step and split.

  Opening it for a run that resumes at `resume_step` drops the lines written after that step's
  checkpoint, so the history of a resumed run has no duplicates, and any line a crash left half
  written. Every write rewrites the file whole (`write_atomic`), as object storage requires."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = path_of(workdir) / 'metrics.jsonl'
    self.active = jax.process_index() == 0
    self.lines = []
    if self.active and self.path.exists():
      lines = [line for line in self.path.read_text().splitlines() if line.strip()]
      records = [_json_or_none(line) for line in lines]
      if None in records:
        logging.warning('Dropping %d unreadable line(s) of %s (a write cut short).',
                        records.count(None), self.path)
      self.lines = [line for line, record in zip(lines, records)
                    if record is not None and record['step'] <= resume_step]
      self._rewrite()

  def write(self, step: int, split: str, values: dict):
    if self.active:
      self.lines.append(json.dumps({'step': step, 'split': split, **values}))
      self._rewrite()

  def _rewrite(self):
    write_atomic(self.path, ''.join(line + '\n' for line in self.lines))
