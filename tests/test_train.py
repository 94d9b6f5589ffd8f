"""The training loop: device-count invariance, exact resume, outputs, optimisers and bad input."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import input_pipeline
import models
import optimizers
import train
from configs import mobilenet_v1, mobilenet_v2, shufflenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    'dataset': 'synthetic', 'num_classes': 4, 'synthetic_train_examples': 64,
    'synthetic_eval_examples': 20, 'batch_size': 16, 'eval_batch_size': 16,
    'model.dropout_rate': 0.0, 'model.bn_momentum': 0.9, 'num_train_steps': 12,
    'log_every_steps': 2, 'eval_every_steps': 6, 'checkpoint_every_steps': 3,
    'optimizer': 'sgd', 'learning_rate': 0.1, 'lr_reference_batch_size': 0, 'schedule': 'cosine',
    'ema_decay': 0.5, 'label_smoothing': 0.1, 'augment': 'pad_crop', 'crop_padding': 2,
}


def tiny_config(**overrides):
  config = mobilenet_v1.get_config('alpha=0.25,res=32')
  for key, value in {**TINY, **overrides}.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _latest_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  return manager.latest_step(), manager.restore(manager.latest_step())


def test_one_step_on_8_devices_equals_1_device():
  config = tiny_config(optimizer='rmsprop', weight_decay=1e-3)
  model = train.check_config(config)
  schedule = optimizers.create_schedule(config, 4, 12)
  state = train.create_train_state(config, model, optimizers.create_optimizer(config, schedule))
  batch = next(input_pipeline.train_batches(input_pipeline.load(config), config))
  batch = jax.tree.map(lambda x: x.reshape(16, *x.shape[2:]), batch)
  results = []
  for n in (8, 1):
    step = jax.pmap(functools.partial(train.train_step, schedule=schedule, config=config,
                                      dropout_key=jax.random.key(0)),
                    axis_name='batch', devices=jax.local_devices()[:n])
    sharded = jax.tree.map(lambda x, n=n: x.reshape(n, -1, *x.shape[1:]), batch)
    new_state, metrics = step(flax.jax_utils.replicate(state, jax.local_devices()[:n]), sharded)
    first = functools.partial(jax.tree.map, lambda x: np.asarray(x)[0])
    results.append((first(new_state), first(metrics)))
  (state8, metrics8), (state1, metrics1) = results
  for name in ('params', 'batch_stats'):
    for a, b in zip(jax.tree.leaves(getattr(state8, name)), jax.tree.leaves(getattr(state1, name))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics8['loss'], metrics1['loss'], rtol=1e-5)
  assert not np.allclose(jax.tree.leaves(state1.params)[0], jax.tree.leaves(state.params)[0])


def _command(workdir, **overrides):
  args = [sys.executable, 'train.py', '--config=configs/mobilenet_v1.py:alpha=0.25,res=32',
          f'--workdir={workdir}']
  return args + [f'--config.{k}={v}' for k, v in {**TINY, **overrides}.items()]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  results = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, results


def test_run_outputs_and_loss_decreases(uninterrupted):
  workdir, results = uninterrupted
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  for key in ('config', 'macs', 'params', 'final_top1', 'final_top5', 'best_top1', 'best_top5',
              'final_ema_top1', 'train_images_per_sec', 'wall_time_sec'):
    assert results[key] is not None, key
  assert results['macs'] > 0 and results['params'] > 0
  assert results['eval_count'] == 20  # 20 examples in two batches of 16: each counted once
  lines = _read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train_lines = [l for l in lines if l['split'] == 'train']
  eval_lines = [l for l in lines if l['split'] == 'eval']
  assert [l['step'] for l in train_lines] == [2, 4, 6, 8, 10, 12]
  assert [l['step'] for l in eval_lines] == [6, 12]
  for line in train_lines:
    assert {'step', 'split', 'loss', 'top1', 'lr', 'images_per_sec'} <= set(line)
  for line in eval_lines:
    assert {'loss', 'top1', 'top5', 'ema_top1'} <= set(line)
  losses = [l['loss'] for l in train_lines]
  assert np.mean(losses[-2:]) < np.mean(losses[:2])
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['12', '6', '9']


def test_kill_9_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
  reference_dir, _ = uninterrupted
  workdir = str(tmp_path / 'resumed')
  process = subprocess.Popen(_command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  checkpoints = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 300
  while not (os.path.isdir(checkpoints) and '3' in os.listdir(checkpoints)):
    assert process.poll() is None and time.time() < deadline, 'no checkpoint was written'
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not os.path.exists(os.path.join(workdir, 'results.json')), 'killed too late'
  killed_at = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert killed_at < 12

  train.train_and_evaluate(tiny_config(), workdir)
  step, resumed = _latest_state(workdir)
  reference_step, reference = _latest_state(reference_dir)
  assert step == reference_step == 12
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)
  def history(path):
    return [(l['step'], l['split'], l['loss'], l['top1'])
            for l in _read_jsonl(os.path.join(path, 'metrics.jsonl'))]
  assert history(workdir) == history(reference_dir)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config(learning_rate=1e30, ema_decay=0.0, log_every_steps=1,
                       checkpoint_every_steps=1, label_smoothing=0.0)
  with pytest.raises(FloatingPointError, match=r'Loss is (nan|inf) at step \d+; stopping'):
    train.train_and_evaluate(config, workdir)
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  lines = _read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
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
    ({'dataset': 'mnist'}, "Dataset 'mnist' is not prepared in"),
])
def test_bad_config_fails_before_compiling(tmp_path, overrides, message):
  config = tiny_config(**overrides)
  with config.unlocked():
    config.data_dir = str(tmp_path / 'no_data')
  start = time.time()
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert time.time() - start < 10
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_command_line_errors(tmp_path):
  unknown = subprocess.run(_command(tmp_path, learning_rat=0.1), cwd=ROOT, capture_output=True,
                           text=True)
  assert unknown.returncode != 0 and 'learning_rat' in unknown.stderr
  bad = subprocess.run(_command(tmp_path, batch_size=12), cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0
  assert bad.stderr.strip().endswith(
      'error: batch_size=12 must be a positive multiple of the 8 devices.')


def test_restart_with_huge_pages(tmp_path, monkeypatch):
  enabled = tmp_path / 'enabled'
  monkeypatch.setattr(train, 'TRANSPARENT_HUGEPAGE', str(enabled))
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  restarts = []
  monkeypatch.setattr(os, 'execve', lambda *args: restarts.append(args))
  enabled.write_text('always [madvise] never\n')
  train.restart_with_huge_pages()
  assert restarts == [(sys.executable, sys.orig_argv,
                       {**os.environ, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'})]
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2')
  assert train.environ_with_huge_pages()['GLIBC_TUNABLES'] == (
      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')
  # Nothing to do where the user chose a setting, where every mapping gets huge pages already
  # ('always'), where there are none ('never') or no such kernel file.
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=0')
  assert train.environ_with_huge_pages() is None
  monkeypatch.delenv('GLIBC_TUNABLES')
  for content in ('[always] madvise never', 'always madvise [never]'):
    enabled.write_text(content)
    assert train.environ_with_huge_pages() is None
  enabled.unlink()
  assert train.environ_with_huge_pages() is None
  train.restart_with_huge_pages()
  assert len(restarts) == 1


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
  with pytest.raises(ValueError, match=r'holds a run with model=.*use a new --workdir'):
    train.train_and_evaluate(tiny_config(**{'model.alpha': 0.5}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_weight_decay_mask_excludes_depthwise_batchnorm_and_biases():
  config = mobilenet_v2.get_config('alpha=0.35,res=32')
  model = models.get_model(config)
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))['params']
  mask = flax.traverse_util.flatten_dict(
      optimizers.weight_decay_mask(params, config.weight_decay_exclude), sep='/')
  decayed = sorted(path for path, on in mask.items() if on)
  assert decayed and all(path.endswith('kernel') and 'depthwise' not in path for path in decayed)
  assert mask['block1/expand/conv/kernel'] and mask['head/classifier/kernel']
  assert not mask['block1/depthwise/conv/kernel']
  assert not mask['block1/expand/bn/scale'] and not mask['block1/expand/bn/bias']
  assert not mask['head/classifier/bias']
  # With zero gradients, only the decayed parameters move.
  tx = optimizers.create_optimizer(tiny_config(weight_decay=0.1, ema_decay=0.0),
                                   optax.constant_schedule(1.0))
  values = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, values), tx.init(values), values)
  for path, update in flax.traverse_util.flatten_dict(updates, sep='/').items():
    assert bool(jnp.any(update != 0)) == mask[path], path


def test_rmsprop_is_tensorflows_form():
  """TF: ms = rho * ms + (1 - rho) g^2 with ms0 = 1; mom = m * mom + lr * g / sqrt(ms + eps)."""
  config = tiny_config(optimizer='rmsprop', weight_decay=0.0)
  tx = optimizers.create_optimizer(config, optax.constant_schedule(0.1))
  params = {'w': jnp.array([1.0, -2.0])}
  state = tx.init(params)
  ms, mom, p = np.ones(2), np.zeros(2), np.array([1.0, -2.0])
  for g in (np.array([0.5, -1.0]), np.array([2.0, 0.25])):
    updates, state = tx.update({'w': jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    ms = 0.9 * ms + 0.1 * g**2
    mom = 0.9 * mom + 0.1 * g / np.sqrt(ms + 1.0)
    p = p - mom
  np.testing.assert_allclose(params['w'], p, rtol=1e-6)


def test_learning_rate_schedules():
  config = tiny_config(schedule='exponential', learning_rate=0.045, lr_decay_rate=0.94,
                       lr_decay_epochs=2.5, lr_staircase=True, warmup_epochs=1.0)
  schedule = optimizers.create_schedule(config, steps_per_epoch=10, total_steps=100)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.0225)
  assert float(schedule(10)) == pytest.approx(0.045)
  assert float(schedule(34)) == pytest.approx(0.045)  # staircase: constant for 2.5 epochs
  assert float(schedule(35)) == pytest.approx(0.045 * 0.94)
  config = tiny_config(schedule='exponential', lr_decay_rate=0.98, lr_decay_epochs=1.0,
                       lr_staircase=False, learning_rate=0.1)
  schedule = optimizers.create_schedule(config, steps_per_epoch=10, total_steps=100)
  assert float(schedule(15)) == pytest.approx(0.1 * 0.98**1.5)
  config = tiny_config(schedule='linear', learning_rate=0.5)
  schedule = optimizers.create_schedule(config, steps_per_epoch=10, total_steps=100)
  assert float(schedule(50)) == pytest.approx(0.25) and float(schedule(100)) == 0.0
  config = tiny_config(schedule='cosine', learning_rate=0.2, lr_reference_batch_size=32)
  schedule = optimizers.create_schedule(config, steps_per_epoch=10, total_steps=100)
  assert float(schedule(0)) == pytest.approx(0.1)  # scaled by batch 16 / 32
  assert float(schedule(50)) == pytest.approx(0.05) and float(schedule(100)) == pytest.approx(0.0)


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


def test_half_precision_step_keeps_float32_state():
  config = tiny_config(half_precision=True)
  model = train.check_config(config)
  assert model.dtype == jnp.bfloat16
  schedule = optimizers.create_schedule(config, 4, 12)
  state = train.create_train_state(config, model, optimizers.create_optimizer(config, schedule))
  batch = next(input_pipeline.train_batches(input_pipeline.load(config), config))
  step = jax.pmap(functools.partial(train.train_step, schedule=schedule, config=config,
                                    dropout_key=jax.random.key(0)), axis_name='batch')
  new_state, metrics = step(flax.jax_utils.replicate(state), batch)
  for tree in (new_state.params, new_state.batch_stats, new_state.opt_state, new_state.ema_params):
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.floating))
  assert np.isfinite(float(metrics['loss'][0]))


def test_ema_averages_weights_and_batchnorm_statistics_with_tf_warmup():
  """ema = d * ema + (1 - d) * new for the weights and the BatchNorm statistics, with TF's
  d = min(ema_decay, (1 + step) / (10 + step)); evaluation uses both averages."""
  config = tiny_config(ema_decay=0.99)
  model = train.check_config(config)
  schedule = optimizers.create_schedule(config, 4, 12)
  state = train.create_train_state(config, model, optimizers.create_optimizer(config, schedule))
  data = input_pipeline.load(config)
  batch = next(input_pipeline.train_batches(data, config))
  step = jax.pmap(functools.partial(train.train_step, schedule=schedule, config=config,
                                    dropout_key=jax.random.key(0)), axis_name='batch')
  new = flax.jax_utils.unreplicate(step(flax.jax_utils.replicate(state), batch)[0])
  decay = 1 / 10  # step 0
  for old, current, ema in ((state.params, new.params, new.ema_params),
                            (state.batch_stats, new.batch_stats, new.ema_batch_stats)):
    for o, c, e in zip(jax.tree.leaves(old), jax.tree.leaves(current), jax.tree.leaves(ema)):
      np.testing.assert_allclose(e, decay * o + (1 - decay) * c, rtol=1e-5, atol=1e-6)
  first_mean = lambda stats: jax.tree.leaves(stats)[0]
  assert not np.allclose(first_mean(new.batch_stats), first_mean(state.batch_stats))

  p_eval = jax.pmap(train.eval_step, axis_name='batch')
  eval_batch = next(input_pipeline.eval_batches(data, config))
  same = flax.jax_utils.unreplicate(p_eval(flax.jax_utils.replicate(
      new.replace(ema_params=new.params, ema_batch_stats=new.batch_stats)), eval_batch))
  assert same['ema_loss'] == same['loss']
  stale = flax.jax_utils.unreplicate(p_eval(flax.jax_utils.replicate(
      new.replace(ema_params=new.params, ema_batch_stats=state.batch_stats)), eval_batch))
  assert stale['loss'] == same['loss'] and stale['ema_loss'] != same['loss']


def test_configs_carry_the_paper_recipes():
  v1, v2, shuffle = mobilenet_v1.get_config(), mobilenet_v2.get_config(), shufflenet.get_config()
  assert (v1.optimizer, v1.learning_rate, v1.lr_decay_rate, v1.lr_decay_epochs) == (
      'rmsprop', 0.045, 0.94, 2.5)
  assert (v2.optimizer, v2.learning_rate, v2.lr_decay_rate, v2.label_smoothing, v2.ema_decay) == (
      'rmsprop', 0.045, 0.98, 0.1, 0.9999)
  assert (v1.weight_decay, v2.weight_decay, shuffle.weight_decay) == (4e-5, 4e-5, 4e-5)
  assert (shuffle.optimizer, shuffle.learning_rate, shuffle.schedule, shuffle.batch_size,
          shuffle.num_train_steps) == ('sgd', 0.5, 'linear', 1024, 300_000)
  for config in (v1, v2, shuffle):
    optimizers.check_config(config)


def test_label_offset_skips_the_background_logit():
  """TF-slim's 1001-class models: label k is logit k + 1 (logit 0 is 'background')."""
  logits = jnp.array([[0.0, 5.0, 1.0], [0.0, 1.0, 5.0]])
  state = train.TrainState.create(
      apply_fn=lambda variables, images, train: logits, params={}, tx=optax.identity(),
      batch_stats={}, ema_params=None, ema_batch_stats=None)
  batch = {'image': np.zeros((1, 2, 1)), 'label': np.array([[0, 1]]), 'mask': np.ones((1, 2))}
  device = jax.local_devices()[:1]
  hits = {}
  for offset in (0, 1):
    step = jax.pmap(functools.partial(train.eval_step, label_offset=offset), axis_name='batch',
                    devices=device)
    hits[offset] = float(step(flax.jax_utils.replicate(state, device), batch)['top1'][0])
  assert hits == {0: 0.0, 1: 2.0}
