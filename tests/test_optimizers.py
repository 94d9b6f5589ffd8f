"""Optimizers, learning-rate schedules and the weight-decay mask (optimizers.py)."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models
import optimizers
from configs import mobilenet_v1, mobilenet_v2, shufflenet
from tests.helpers import tiny_config


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


def test_paper_configs_give_the_papers_learning_rates():
  """MobileNet V1: 0.045 x 0.94 every 2.5 epochs, V2: 0.045 x 0.98 every epoch (RMSProp at a
  global batch of 1536); ShuffleNet: 0.5 linearly to 0 over 3e5 iterations (batch 1024); the
  rate scales with the global batch."""
  per_epoch = 1_281_167 // 1536  # ImageNet steps an epoch
  v1 = optimizers.create_schedule(mobilenet_v1.get_config(), per_epoch, 300 * per_epoch)
  decay_steps = int(2.5 * per_epoch)
  assert float(v1(0)) == float(v1(decay_steps - 1)) == pytest.approx(0.045)
  assert float(v1(decay_steps)) == pytest.approx(0.045 * 0.94)
  v2 = optimizers.create_schedule(mobilenet_v2.get_config(), per_epoch, 300 * per_epoch)
  assert float(v2(10 * per_epoch)) == pytest.approx(0.045 * 0.98**10)
  config = shufflenet.get_config()
  linear = optimizers.create_schedule(config, 1_281_167 // 1024, config.num_train_steps)
  assert [float(linear(s)) for s in (0, 150_000, 300_000)] == pytest.approx([0.5, 0.25, 0.0])
  config.batch_size = 512
  half = optimizers.create_schedule(config, 1_281_167 // 512, config.num_train_steps)
  assert float(half(0)) == pytest.approx(0.25)
