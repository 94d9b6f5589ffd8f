"""oneDNN's convolutions (models/onednn.py): exact on every convolution of the networks, forward
and both gradients, against a float64 reference; the networks' fallback where the library does
not load."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mobilenet_v1, mobilenet_v2, shufflenet
import models
from models import layers
from models import onednn


def network_convolutions(config, batch_size: int) -> list[tuple]:
  """The distinct (x shape, kernel shape, strides, padding, groups) of every convolution that
  `config`'s network computes with conv_impl='onednn' on a batch of `batch_size`."""
  calls = []
  def record(x, kernel, strides, padding, groups):
    calls.append((x.shape, kernel.shape, tuple(strides), tuple(map(tuple, padding)), groups))
    return jnp.zeros(onednn.output_shape(x.shape, kernel.shape, strides, padding), x.dtype)
  model = models.get_model(config, conv_impl='onednn')
  image = jnp.zeros((batch_size, config.image_size, config.image_size, 3))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(onednn, 'conv', record)
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
  return sorted(set(calls))


def conv_kind(x_shape, kernel_shape, unused_strides, unused_padding, groups) -> str:
  if groups > 1:
    return 'depthwise' if groups == x_shape[-1] == kernel_shape[-1] else 'grouped'
  return 'pointwise' if kernel_shape[:2] == (1, 1) else 'full'


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def conv_and_gradients(x, kernel, dy, strides, padding, groups, conv):
  """(y, dx, dkernel) of `conv` at (x, kernel) with the output cotangent dy."""
  y, vjp = jax.vjp(lambda x, kernel: conv(x, kernel, strides, padding, groups), x, kernel)
  return (y, *vjp(dy))


def xla_conv(x, kernel, strides, padding, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)


def assert_exact(x_shape, kernel_shape, strides, padding, groups):
  """oneDNN's y, dx and dkernel equal the float64 results to float32 rounding: within
  4 sqrt(K) float32 epsilons of the sum of the absolute values of the K products each output
  adds up (the float64 result of the same convolution on |x|, |kernel| and |dy|)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=x_shape)
  kernel = rng.normal(size=kernel_shape)
  dy = rng.normal(size=onednn.output_shape(x_shape, kernel_shape, strides, padding))
  settings = (strides, padding, groups)
  with jax.enable_x64(True):
    exact, magnitude = ([np.asarray(r) for r in conv_and_gradients(
        *(jnp.asarray(a, jnp.float64) for a in arrays), *settings, xla_conv)]
                        for arrays in ((x, kernel, dy), (abs(x), abs(kernel), abs(dy))))
  float32 = [jnp.asarray(a, jnp.float32) for a in (x, kernel, dy)]
  ours = conv_and_gradients(*float32, *settings, onednn.conv)
  xla = conv_and_gradients(*float32, *settings, xla_conv)
  (kh, kw, group_inputs, outputs), (_, oh, ow, _) = kernel_shape, dy.shape
  products = {'y': kh * kw * group_inputs, 'dx': kh * kw * outputs // groups,
              'dkernel': x_shape[0] * oh * ow}
  for name, reference, scale, a, b in zip(products, exact, magnitude, ours, xla):
    assert a.shape == reference.shape, name
    tolerance = 4 * np.sqrt(products[name]) * np.finfo(np.float32).eps * scale
    error = np.abs(np.asarray(a, np.float64) - reference)
    xla_error = np.abs(np.asarray(b, np.float64) - reference).max()
    assert np.all(error <= tolerance), (
        f'{name} of {x_shape} * {kernel_shape}, strides {strides}, padding {padding}, groups '
        f'{groups}: oneDNN is {error.max():.3g} from float64 (XLA float32: {xla_error:.3g})')


# Every depthwise layer of the three networks at full size, batch 1 (224 px: sizes 112 to 7).
FULL_SIZE = {
    'v1_1.0_224': (mobilenet_v1, 'alpha=1.0,res=224'),
    'v2_1.0_224': (mobilenet_v2, 'alpha=1.0,res=224'),
    'shufflenet_g3_224': (shufflenet, 'groups=3,res=224'),
}
# Every convolution of every kind (depthwise, pointwise, grouped, the full stem) with odd sizes into
# stride-2 layers (200 px: 100, 50, 25, 13, 7), SAME's asymmetric padding and ShuffleNet's
# symmetric one, at a batch of 3, which two or more threads split unevenly.
EVERY_KIND = {
    'v2_0.35_200': (mobilenet_v2, 'alpha=0.35,res=200'),
    'shufflenet_g8_0.5_200': (shufflenet, 'groups=8,scale=0.5,res=200'),
}


@pytest.mark.parametrize('network', FULL_SIZE)
def test_every_depthwise_layer_at_full_size_matches_float64(network):
  module, argument = FULL_SIZE[network]
  convolutions = [c for c in network_convolutions(module.get_config(argument), 1)
                  if conv_kind(*c) == 'depthwise']
  assert len({c[2] for c in convolutions}) == 2  # strides 1 and 2
  for convolution in convolutions:
    assert_exact(*convolution)


@pytest.mark.parametrize('network', EVERY_KIND)
def test_every_convolution_at_odd_sizes_and_batch_3_matches_float64(network):
  module, argument = EVERY_KIND[network]
  convolutions = network_convolutions(module.get_config(argument), 3)
  kinds = {conv_kind(*convolution) for convolution in convolutions}
  assert kinds == ({'depthwise', 'pointwise', 'full'} |
                   ({'grouped'} if network.startswith('shufflenet') else set()))
  for convolution in convolutions:
    assert_exact(*convolution)


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('x_shape,kernel_shape,strides,padding,groups', [
    ((2, 9, 8, 6), (3, 3, 1, 6), (2, 2), ((1, 1), (0, 1)), 6),  # uneven padding, odd height
    ((4, 6, 7, 12), (3, 3, 4, 12), (1, 2), ((1, 1), (1, 1)), 3),  # grouped, unequal strides
    ((1, 5, 5, 4), (5, 5, 1, 4), (1, 1), ((2, 2), (2, 2)), 4),  # a 5x5 depthwise kernel
])
def test_other_geometries_match_float64_on_one_or_two_threads(
    x_shape, kernel_shape, strides, padding, groups, threads, monkeypatch):
  """On two threads a call splits its batch (2 and 4 images) in two and sums the two halves'
  kernel gradients."""
  monkeypatch.setattr(onednn, 'threads_per_call', lambda: threads)
  assert_exact(x_shape, kernel_shape, strides, padding, groups)


@pytest.mark.parametrize('size', [8, 13])
def test_average_pool_as_a_convolution_matches_float64(size):
  """ShuffleNet's stride-2 shortcut pool (3x3, zero padding 1 counted): oneDNN's constant-kernel
  depthwise convolution gives the average and its input gradient of `nn.avg_pool` in float64."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, size, size, 24))
  dy = rng.normal(size=(3, (size - 1) // 2 + 1, (size - 1) // 2 + 1, 24))
  def pool_and_gradient(x, dy, conv_impl):
    y, vjp = jax.vjp(lambda x: layers.average_pool(x, 3, 2, 1, conv_impl), x)
    return y, *vjp(dy)
  with jax.enable_x64(True):
    exact = pool_and_gradient(jnp.asarray(x), jnp.asarray(dy), 'xla')
    magnitude = pool_and_gradient(jnp.asarray(abs(x)), jnp.asarray(abs(dy)), 'xla')
  ours = pool_and_gradient(jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32), 'onednn')
  for name, a, reference, scale in zip(('y', 'dx'), ours, exact, magnitude):
    assert a.shape == reference.shape, name
    error = np.abs(np.asarray(a, np.float64) - np.asarray(reference))
    assert np.all(error <= 4 * 3 * np.finfo(np.float32).eps * np.asarray(scale)), (
        f'{name} at {size} px: {error.max():.3g} from float64')


@pytest.mark.parametrize('size,padding', [(16, ((1, 1), (1, 1))), (13, ((0, 1), (1, 0)))])
def test_max_pool_tap_gradient_equals_xlas(size, padding):
  """With oneDNN, a max pool's gradient is computed from its taps: the same as XLA's
  select-and-scatter, ties (the zeros after a ReLU) going to the window's first maximum."""
  rng = np.random.default_rng(0)
  x = np.maximum(rng.normal(size=(2, size, size, 8)), 0)  # half zeros: ties in most windows
  x[0, :3, :3] = 1.0  # ties of equal positive values
  def pool_and_gradient(x, conv_impl):
    y, vjp = jax.vjp(lambda x: layers.max_pool(x, 3, 2, padding, conv_impl), x)
    return y, *vjp(jnp.asarray(rng.normal(size=y.shape), x.dtype))
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    exact = pool_and_gradient(jnp.asarray(x), 'xla')
    rng = np.random.default_rng(1)
    ours = pool_and_gradient(jnp.asarray(x), 'onednn')
  for name, a, reference in zip(('y', 'dx'), ours, exact):
    assert a.shape == reference.shape, name
    np.testing.assert_allclose(a, reference, rtol=1e-15, atol=1e-15, err_msg=name)


def test_networks_fall_back_to_xla_with_one_warning_when_the_library_does_not_load(tmp_path):
  """With the library missing, conv_impl='auto' is ShiftedConv and says so once, however often
  the networks ask; conv_impl='onednn' is one error naming the build command."""
  program = f"""
from models import layers
from models import onednn
onednn.LIBRARY = {str(tmp_path / 'missing.so')!r}
from configs import mobilenet_v1
import models
from models import layers
config = mobilenet_v1.get_config('alpha=0.25,res=32')
print('auto:', [layers.conv_module('auto').__name__ for _ in range(2)])
try:
  models.get_model(config, conv_impl='onednn')
except ValueError as e:
  print('error:', e)
"""
  out = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True, timeout=300,
                       check=True)
  warnings = [line for line in out.stderr.splitlines() if 'oneDNN convolutions unavailable' in line]
  assert len(warnings) == 1, out.stderr
  assert 'missing.so' in warnings[0] and 'bash models/native/build.sh' in warnings[0]
  assert "auto: ['ShiftedConv', 'ShiftedConv']" in out.stdout
  assert "error: model.conv_impl='onednn' needs the oneDNN library" in out.stdout
  assert 'bash models/native/build.sh' in out.stdout


def test_uses_xla_threads_and_starts_none_of_its_own(monkeypatch):
  """oneDNN runs on XLA's intra-op threads (the batch split among them), not on OpenMP threads of
  its own that would compete with XLA's for the cores."""
  monkeypatch.setattr(onednn, 'threads_per_call', lambda: 2)
  def threads():
    return set(os.listdir('/proc/self/task'))
  x = jnp.ones((8, 12, 12, 16))
  kernel = jnp.ones((3, 3, 1, 16))
  def loss(conv):
    return jax.jit(jax.grad(lambda x, k: conv(x, k, (1, 1), ((1, 1), (1, 1)), 16).sum(),
                            argnums=(0, 1)))
  jax.block_until_ready(loss(xla_conv)(x, kernel))  # XLA's own threads exist from here on
  before = threads()
  dx, dkernel = jax.block_until_ready(loss(onednn.conv)(x, kernel))
  assert threads() == before
  # Every image's gradient, whichever thread computed it: interior pixels see all 9 taps.
  assert float(dx[7, 5, 5, 0]) == 9.0 and float(dkernel[1, 1, 0, 0]) == 8 * 12 * 12
