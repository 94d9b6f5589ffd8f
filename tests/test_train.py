"""The training loop: device-count invariance, outputs, intervals, resume checks and bad input."""

import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import input_pipeline
import models
import train
import workdirs
from configs import cifar10, quickstart
from tests.helpers import read_jsonl, run_tool, tiny_config, train_args


def test_one_step_on_8_devices_equals_1_device(train_state_and_step):
  config = tiny_config(optimizer='rmsprop', weight_decay=1e-3)
  data = input_pipeline.load(config)
  batch = next(input_pipeline.train_batches(data, config, 4))
  batch = jax.tree.map(lambda x: x.reshape(16, *x.shape[2:]), batch)
  results = []
  for n in (8, 1):
    state, step = train_state_and_step(config, jax.local_devices()[:n])
    sharded = jax.tree.map(lambda x, n=n: x.reshape(n, -1, *x.shape[1:]), batch)
    results.append(jax.device_get(step(state, sharded)))
  (state8, metrics8), (state1, metrics1) = results
  for name in ('params', 'batch_stats'):
    for a, b in zip(jax.tree.leaves(getattr(state8, name)), jax.tree.leaves(getattr(state1, name))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics8['loss'], metrics1['loss'], rtol=1e-5)
  assert not np.allclose(jax.tree.leaves(state1.params)[0], jax.tree.leaves(state.params)[0])


def test_run_outputs(uninterrupted):
  workdir, results = uninterrupted
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  for key in ('config', 'macs', 'params', 'final_top1', 'final_top5', 'best_top1', 'best_top5',
              'final_ema_top1', 'train_images_per_sec', 'wall_time_sec', 'compile_sec', 'eval_sec',
              'checkpoint_sec'):
    assert results[key] is not None, key
  parts = results['compile_sec'] + results['eval_sec'] + results['checkpoint_sec']
  assert 0 < parts < results['wall_time_sec']
  assert results['macs'] > 0 and results['params'] > 0
  assert results['eval_count'] == 20  # 20 examples in two batches of 16: each counted once
  lines = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train_lines = [l for l in lines if l['split'] == 'train']
  eval_lines = [l for l in lines if l['split'] == 'eval']
  assert [l['step'] for l in train_lines] == [2, 4, 6, 8, 10, 12]
  assert [l['step'] for l in eval_lines] == [6, 12]
  for line in train_lines:
    assert {'step', 'split', 'loss', 'top1', 'lr', 'images_per_sec'} <= set(line)
  for line in eval_lines:
    assert {'loss', 'top1', 'top5', 'ema_top1'} <= set(line)
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['12', '6', '9']


def test_training_learns_the_synthetic_classes(tmp_path):
  """64 steps on the synthetic classes (a fixed pattern each, under noise): enough that learning
  is certain whatever the processor's rounding (over seeds 0-2 the loss fell to 0.33-0.38 of its
  start and top-1 reached 0.84-1.0 of 96 examples, against 0.25 by chance), unlike the 12 steps of
  the tiny run, whose direction rounding decides."""
  results = train.train_and_evaluate(
      tiny_config(num_train_steps=64, log_every_steps=8, ema_decay=0.0,
                  synthetic_eval_examples=96, eval_every_steps=64, checkpoint_every_steps=64),
      str(tmp_path))
  losses = [l['loss'] for l in read_jsonl(tmp_path / 'metrics.jsonl') if l['split'] == 'train']
  assert np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2]), losses
  assert results['final_top1'] >= 0.6


def test_intervals_in_epochs_become_steps():
  # Fashion-MNIST at batch 128 has 468 steps an epoch, CIFAR-10 390.
  for name in ('eval', 'checkpoint'):
    assert train.interval_steps(quickstart.get_config(), name, 468) == 468
    assert train.interval_steps(cifar10.get_config(), name, 390) == 1950
  def eval_interval(steps, epochs):
    config = tiny_config(eval_every_steps=steps, eval_every_epochs=epochs)
    return train.interval_steps(config, 'eval', 4)
  assert eval_interval(-1, 0.5) == 2
  assert eval_interval(6, 0.5) == 6  # steps, where given, override epochs
  assert eval_interval(-1, 0.01) == 1


def test_a_run_evaluates_and_checkpoints_by_epochs(tmp_path):
  config = tiny_config(num_train_steps=8, eval_every_steps=-1, eval_every_epochs=1.0,
                       checkpoint_every_steps=-1, checkpoint_every_epochs=0.5)
  train.train_and_evaluate(config, str(tmp_path))  # 64 examples in batches of 16: 4 steps
  evals = [l['step'] for l in read_jsonl(tmp_path / 'metrics.jsonl') if l['split'] == 'eval']
  assert evals == [4, 8]
  assert ocp.CheckpointManager(tmp_path / 'checkpoints').all_steps() == [4, 6, 8]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config(learning_rate=1e30, ema_decay=0.0, log_every_steps=1,
                       checkpoint_every_steps=1, label_smoothing=0.0)
  with pytest.raises(FloatingPointError, match=r'Loss is (nan|inf) at step \d+; stopping'):
    train.train_and_evaluate(config, workdir)
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  lines = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert saved and all(np.isfinite(l['loss']) for l in lines if l['step'] <= saved[-1])
  assert not os.path.exists(os.path.join(workdir, 'results.json'))


@pytest.mark.parametrize('overrides,message', [
    ({'batch_size': 12}, 'batch_size=12 must be a positive multiple of the 8 devices'),
    ({'eval_batch_size': 4}, 'eval_batch_size=4 must be a positive multiple of the 8 devices'),
    ({'learning_rate': 0.0}, 'learning_rate must be > 0'),
    ({'learning_rate': -0.1}, 'learning_rate must be > 0'),
    ({'optimizer': 'adam'}, "Unknown optimizer 'adam'; valid: sgd, rmsprop, adamw"),
    ({'schedule': 'step'}, "Unknown schedule 'step'; valid: exponential, cosine, linear"),
    ({'weight_decay_type': 'l1'}, "Unknown weight_decay_type 'l1'"),
    ({'model.alpha': 0.0}, 'model.alpha must be > 0'),
    ({'synthetic_train_examples': 12},
     'synthetic has 12 training examples .*fewer than one batch of batch_size=16'),
    ({'synthetic_eval_examples': 0}, 'synthetic has no evaluation examples'),
    ({'num_train_steps': -1, 'num_epochs': 0.0}, 'num_epochs=0.0 of 4 steps gives no training step'),
    ({'num_train_steps': -1, 'num_epochs': -1.0}, 'gives no training step'),
    ({'data_dir': __file__, 'dataset': 'cifar10'}, 'is a file: give the TFDS data directory'),
    ({'eval_every_steps': -1, 'eval_every_epochs': 0.0}, 'eval_every_epochs must be > 0'),
    ({'checkpoint_every_steps': 0, 'checkpoint_every_epochs': -1.0},
     'checkpoint_every_epochs must be > 0'),
    ({'dataset': 'mnist'}, "Dataset 'mnist' is not prepared in"),
    ({'train_resize_method': 'area'}, "Unknown train_resize_method 'area'; valid: bilinear"),
])
def test_bad_config_fails_before_compiling(tmp_path, monkeypatch, overrides, message):
  config = tiny_config(**{'data_dir': str(tmp_path / 'no_data'), **overrides})
  def compile_anything(*args, **kwargs):
    raise AssertionError('compiled before the bad setting was reported')
  for name in ('jit', 'pmap'):
    monkeypatch.setattr(jax, name, compile_anything)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


@pytest.mark.slow
def test_command_line_errors(tmp_path):
  def last_line(**overrides):
    run = run_tool(*train_args(tmp_path, **overrides))
    assert run.returncode != 0 and 'Traceback' not in run.stderr, run.stderr[-3000:]
    return run.stderr.strip().splitlines()[-1]
  assert last_line(learning_rat=0.1) == (
      "error: bad flag: 'learning_rat' is not a config field "
      '(Did you mean "learning_rate" instead of "learning_rat"?)')
  assert last_line(batch_size=12) == (
      'error: batch_size=12 must be a positive multiple of the 8 devices.')


def test_checkpoint_of_another_trainstate_is_a_clear_error(tmp_path):
  workdir = str(tmp_path / 'run')
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(3, args=ocp.args.StandardSave({'step': np.int32(3), 'params': {'w': np.ones(2)}}))
  manager.wait_until_finished()
  with pytest.raises(ValueError, match='written by another version of train.py. Use a new'):
    train.train_and_evaluate(tiny_config(), workdir)
  assert ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')).all_steps() == [3]


def test_resume_with_a_different_model_is_refused(uninterrupted):
  workdir, _ = uninterrupted
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  with pytest.raises(ValueError, match=r'holds a run with model\.alpha=0\.25, .*use a new --workdir'):
    train.train_and_evaluate(tiny_config(**{'model.alpha': 0.5}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_eval_batches_cover_every_example_once():
  config = tiny_config()
  data = input_pipeline.load(config)
  seen = []
  for batch in input_pipeline.eval_batches(data, config):
    assert batch['image'].shape == (8, 2, 32, 32, 3)
    mask = batch['mask'].reshape(-1).astype(bool)
    seen += list(batch['label'].reshape(-1)[mask])
  labels = [int(e['label']) for e in data.examples('eval').as_numpy_iterator()]
  assert sorted(seen) == sorted(labels) and len(seen) == 20


def test_the_train_step_compiles_once(train_state_and_step):
  """The replicated state is placed as the step returns it, so its output does not recompile it."""
  config = tiny_config()
  state, step = train_state_and_step(config)
  batches = input_pipeline.train_batches(input_pipeline.load(config), config, 4)
  lowerings = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **kwargs: lowerings.append(event)
      if event == '/jax/core/compile/jaxpr_to_mlir_module_duration' else None)
  state = step(train.replicated(state), next(batches))[0]
  assert lowerings  # the first step compiles (the listener sees it)
  lowerings.clear()
  for _ in range(2):
    state = step(state, next(batches))[0]
  jax.block_until_ready(state)
  assert not lowerings


def test_the_train_step_takes_uint8_pixels(train_state_and_step):
  """Training batches are uint8 pixels the step normalizes; normalized floats would be
  normalized twice, so they are refused."""
  config = tiny_config()
  state, step = train_state_and_step(config)
  batch = next(input_pipeline.train_batches(input_pipeline.load(config), config, 4))
  assert batch['image'].dtype == np.uint8
  with pytest.raises(TypeError, match='train_step takes uint8 pixels'):
    step(train.replicated(state), {**batch, 'image': batch['image'].astype(np.float32)})


def test_half_precision_step_keeps_float32_state(train_state_and_step):
  config = tiny_config(half_precision=True)
  assert models.get_model(config).dtype == jnp.bfloat16
  state, step = train_state_and_step(config)
  batch = next(input_pipeline.train_batches(input_pipeline.load(config), config, 4))
  new_state, metrics = step(state, batch)
  for tree in (new_state.params, new_state.batch_stats, new_state.opt_state, new_state.ema_params):
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.floating))
  assert np.isfinite(float(metrics['loss']))


def test_ema_averages_weights_and_batchnorm_statistics_with_tf_warmup(train_state_and_step):
  """ema = d * ema + (1 - d) * new for the weights and the BatchNorm statistics, with TF's
  d = min(ema_decay, (1 + step) / (10 + step)); evaluation uses both averages."""
  config = tiny_config(ema_decay=0.99)
  state, step = train_state_and_step(config)
  data = input_pipeline.load(config)
  batch = next(input_pipeline.train_batches(data, config, 4))
  new = jax.device_get(step(state, batch)[0])
  decay = 1 / 10  # step 0
  for old, current, ema in ((state.params, new.params, new.ema_params),
                            (state.batch_stats, new.batch_stats, new.ema_batch_stats)):
    for o, c, e in zip(jax.tree.leaves(old), jax.tree.leaves(current), jax.tree.leaves(ema)):
      np.testing.assert_allclose(e, decay * o + (1 - decay) * c, rtol=1e-5, atol=1e-6)
  first_mean = lambda stats: jax.tree.leaves(stats)[0]
  assert not np.allclose(first_mean(new.batch_stats), first_mean(state.batch_stats))

  p_eval = train.pmap_eval_step(config)
  eval_batch = next(input_pipeline.eval_batches(data, config))
  same = p_eval(new.replace(ema_params=new.params, ema_batch_stats=new.batch_stats), eval_batch)
  assert same['ema_loss'] == same['loss']
  stale = p_eval(new.replace(ema_params=new.params, ema_batch_stats=state.batch_stats),
                 eval_batch)
  assert stale['loss'] == same['loss'] and stale['ema_loss'] != same['loss']


def test_label_offset_skips_the_background_logit():
  """TF-slim's 1001-class models: label k is logit k + 1 (logit 0 is 'background')."""
  logits = jnp.array([[0.0, 5.0, 1.0], [0.0, 1.0, 5.0]])
  state = workdirs.new_train_state(lambda variables, images, train: logits,
                                   {'params': {}, 'batch_stats': {}}, optax.identity(),
                                   keep_ema=False)
  batch = {'image': np.zeros((1, 2, 1)), 'label': np.array([[0, 1]]), 'mask': np.ones((1, 2))}
  device = jax.local_devices()[:1]
  hits = {}
  for offset in (0, 1):
    step = train.pmap_eval_step(tiny_config(label_offset=offset), devices=device)
    hits[offset] = float(step(state, batch)['top1'])
  assert hits == {0: 0.0, 1: 2.0}


@pytest.mark.slow
def test_one_device_checkpoints_hold_unreplicated_arrays_and_resume(tmp_path):
  """On one device (a plain CPU), checkpoints hold the model's own shapes, so that predict.py,
  eval_only and init_from read them and a rerun resumes from them."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  def run(steps):
    return run_tool(*train_args(tmp_path, num_train_steps=steps, eval_every_steps=-1), env=env,
                    timeout=600)
  first = run(3)
  assert first.returncode == 0, first.stderr[-3000:]
  variables, step = workdirs.restore_variables(str(tmp_path))
  model = models.get_model(tiny_config())
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  assert step == 3
  assert jax.tree.map(np.shape, variables['params']) == jax.tree.map(np.shape, shapes['params'])
  stored = ocp.CheckpointManager(tmp_path / 'checkpoints',
                                 item_handlers=ocp.StandardCheckpointHandler()).item_metadata(3)
  assert tuple(stored['step'].shape) == ()  # as written, with no replica axis
  assert tuple(stored['params']['head']['classifier']['bias'].shape) == (4,)
  second = run(6)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resumed from the checkpoint at step 3' in second.stderr
  assert workdirs.restore_variables(str(tmp_path))[1] == 6


def test_a_config_json_of_an_earlier_version_is_one_clear_error(uninterrupted, tmp_path):
  """A workdir whose config.json lacks settings that this version has (written before they
  existed) is refused naming them, not read with today's defaults; nothing is touched."""
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted[0], workdir)
  saved = json.loads((workdir / 'config.json').read_text())
  del saved['train_resize_method'], saved['model']['separable']
  (workdir / 'config.json').write_text(json.dumps(saved))
  before = sorted(os.listdir(workdir / 'checkpoints'))
  message = (r'config.json was written by an earlier version of this project: it has no '
             r'train_resize_method, model.separable\. Train again in a new --workdir')
  for read in (lambda: train.train_and_evaluate(tiny_config(), str(workdir)),
               lambda: workdirs.load_for_inference(str(workdir))):
    with pytest.raises(ValueError, match=message):
      read()
  assert sorted(os.listdir(workdir / 'checkpoints')) == before
  assert json.loads((workdir / 'config.json').read_text()) == saved


@pytest.mark.slow
def test_the_console_shows_each_event_once_and_only_ours(tmp_path):
  """main.py's console: log lines of this project's modules only (no library chatter, no
  hyperparameter dump), none twice, a progress line with its ETA at every log step."""
  run = run_tool(*train_args(tmp_path), timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stderr.strip().splitlines()
  records = [re.match(r'[IWEF]\d{4} [\d:.]+ +\d+ (\w+\.py):\d+\] (.*)$', line) for line in lines]
  assert all(records), [line for line, r in zip(lines, records) if not r]
  assert {r.group(1) for r in records} <= {'main.py', 'train.py'}, lines
  messages = [r.group(2) for r in records]
  assert len(set(messages)) == len(messages), messages
  progress = [m for m in messages if m.startswith('step ')]
  assert len(progress) == 6 and all(' ETA ' in m for m in progress), messages
  assert sum(m.startswith('eval at step ') for m in messages) == 2
