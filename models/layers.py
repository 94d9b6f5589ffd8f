"""Building blocks shared by every network here.

Every network is a stack of `ConvBN` blocks (convolution -> BatchNorm -> optional activation;
SqueezeNet's have a bias instead of BatchNorm) followed by a classifier head. Depthwise and grouped
convolutions are `nn.Conv` with `feature_group_count` on GPUs and TPUs, and the same computation by
oneDNN (`OneDNNConv`) or as shifted products (`ShiftedConv`) on the CPU (`Backbone.conv_impl`).
With oneDNN, BatchNorm (`BatchNorm`) and the pools (`average_pool`, `max_pool`) also compute their
gradients in ways faster on the CPU, with the same results. All tensors are NHWC.
"""

import functools
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import onednn

ModuleDef = Any
Padding = Union[str, Sequence[tuple[int, int]]]

# He-normal on the fan-out, the initialisation of the torchvision and timm MobileNets.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
dense_kernel_init = nn.initializers.normal(stddev=0.01)


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
  """Rounds `value` to the nearest multiple of `divisor`, never going below 90% of it.

  The channel rounding of the MobileNet V2 reference implementations (TF-slim, Keras, torchvision).
  """
  min_value = divisor if min_value is None else min_value
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def round_to_multiple(value: int, divisor: int) -> int:
  """The multiple of `divisor` nearest to `value` (ties round up), at least `divisor`."""
  return max(divisor, (value + divisor // 2) // divisor * divisor)


def channel_shuffle(x: jnp.ndarray, groups: int) -> jnp.ndarray:
  """ShuffleNet's channel shuffle (Zhang et al. 2017, section 3.1).

  The channel axis is reshaped to (groups, n), transposed to (n, groups) and flattened, so output
  channel i * groups + j is input channel j * n + i.
  """
  *batch_dims, channels = x.shape
  if channels % groups:
    raise ValueError(f'channel_shuffle: {channels} channels do not split into {groups} groups.')
  x = x.reshape(*batch_dims, groups, channels // groups)
  x = jnp.swapaxes(x, -1, -2)
  return x.reshape(*batch_dims, channels)


def same_padding(kernel_size: int) -> Padding:
  """TensorFlow's 'SAME' rule (for stride 2 and even inputs: 0 before, 1 after)."""
  del kernel_size
  return 'SAME'


def valid_padding(kernel_size: int) -> Padding:
  """No padding (Caffe's default, Xception's first two convolutions)."""
  del kernel_size
  return 'VALID'


def symmetric_padding(kernel_size: int) -> Padding:
  """Caffe/PyTorch padding: kernel_size // 2 on every side."""
  return ((kernel_size // 2, kernel_size // 2),) * 2


def _explicit_padding(padding: Padding, size: int, kernel: int, stride: int) -> tuple[int, int]:
  if padding == 'SAME':
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2
  if padding == 'VALID':
    return 0, 0
  raise ValueError(f'Unsupported padding {padding!r}.')


class ShiftedConv(nn.Module):
  """A convolution computed as a sum over the k * k kernel taps of shifted input windows times
  the tap's weights: a matrix product for full and pointwise convolutions, a batched one for group
  convolutions, an element-wise product for depthwise ones.

  Same parameter ('kernel', shape (k, k, Cin / groups, Cout)) and the same outputs as `nn.Conv`;
  XLA's CPU backend runs `conv_general_dilated` (above all its gradients) several times slower
  than these products, so the networks use this module on the CPU where oneDNN's kernels
  (`OneDNNConv`) are not built, and `nn.Conv` on GPUs and TPUs.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = 'SAME'
  feature_group_count: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Callable = conv_kernel_init

  @nn.compact
  def __call__(self, x):
    (kh, kw), groups = self.kernel_size, self.feature_group_count
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, x.shape[-1] // groups, self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if isinstance(self.padding, str):
      pads = tuple(_explicit_padding(self.padding, x.shape[d], k, s)
                   for d, k, s in ((1, kh, self.strides[0]), (2, kw, self.strides[1])))
    else:
      pads = tuple(tuple(p) for p in self.padding)
    y = self.convolve(x, kernel, tuple(self.strides), pads)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return y

  def convolve(self, x, kernel, strides, pads):
    """The convolution of `x` with `kernel` at explicit paddings ((top, bottom), (left, right))."""
    (kh, kw), (sh, sw), groups = kernel.shape[:2], strides, self.feature_group_count
    depthwise = groups == x.shape[-1] == self.features and groups > 1
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    y = 0
    for i in range(kh):
      for j in range(kw):
        window = x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
        tap = kernel[i, j]  # (Cin / groups, Cout)
        if depthwise:
          y = y + window * tap[0]
        elif groups == 1:
          y = y + jnp.dot(window, tap)
        else:
          tap = tap.reshape(tap.shape[0], groups, -1).transpose(1, 0, 2)
          window = window.reshape(*window.shape[:-1], groups, -1)
          y = y + jnp.einsum('nhwgc,gcd->nhwgd', window, tap).reshape(*window.shape[:3], -1)
    return y


class OneDNNConv(ShiftedConv):
  """`ShiftedConv`'s parameter and outputs, computed by oneDNN's convolution kernels (those of
  PyTorch on the CPU) through an XLA FFI call (`models/onednn.py`): forward pass and both
  gradients. Float32 only; other dtypes (bfloat16) compute as `ShiftedConv`."""

  def convolve(self, x, kernel, strides, pads):
    if x.dtype != jnp.float32:
      return super().convolve(x, kernel, strides, pads)
    return onednn.conv(x, kernel, strides, pads, self.feature_group_count)


CONV_IMPLS = ('auto', 'xla', 'shifted', 'onednn')


def conv_module(conv_impl: str) -> ModuleDef:
  """The convolution module of `Backbone.conv_impl` on this process's default backend."""
  if conv_impl == 'auto':
    conv_impl = 'xla' if jax.default_backend() != 'cpu' else (
        'onednn' if onednn.available() else 'shifted')
  return {'xla': nn.Conv, 'shifted': ShiftedConv, 'onednn': OneDNNConv}[conv_impl]


def average_pool(x, window: int, strides: int, padding: int, conv_impl: str):
  """`nn.avg_pool` of `x` zero-padded by `padding` on every side, the zeros counted in the average
  (PyTorch's `count_include_pad`). Where `conv_impl` computes with oneDNN, a depthwise convolution
  with a constant 1 / window^2 kernel instead: the same average, and oneDNN's backward pass is
  several times faster than XLA's CPU reduce-window (docs/performance.md)."""
  if computes_with_onednn(conv_impl) and x.dtype == jnp.float32:
    channels = x.shape[-1]
    kernel = jnp.full((window, window, 1, channels), 1 / window**2, jnp.float32)
    return onednn.conv(x, kernel, (strides, strides), ((padding, padding),) * 2, channels)
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  # Padded first, so that LiteRT gets a plain AVERAGE_POOL_2D.
  return nn.avg_pool(jnp.pad(x, pads), (window, window), (strides, strides))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_with_tap_gradient(x, window: int, strides: int, padding: Padding):
  """`nn.max_pool(x, (window, window), (strides, strides), padding)` (explicit paddings), whose
  gradient goes to the first maximum of each window in row-major order, as XLA's
  select-and-scatter, computed as k * k masked, strided copies of the output cotangent."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, strides, strides, 1), ((0, 0), *padding, (0, 0)))


def _max_pool_forward(x, window, strides, padding):
  y = _max_pool_with_tap_gradient(x, window, strides, padding)
  return y, (x, y)


def _max_pool_backward(window, strides, padding, residuals, dy):
  x, y = residuals
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  (_, height, width, _), (_, out_h, out_w, _) = padded.shape, y.shape
  taken = jnp.zeros(y.shape, bool)
  dx = jnp.zeros_like(padded)
  for i in range(window):
    for j in range(window):
      tap = padded[:, i:i + strides * (out_h - 1) + 1:strides,
                   j:j + strides * (out_w - 1) + 1:strides, :]
      first = (tap == y) & ~taken
      taken = taken | first
      dx = dx + jax.lax.pad(jnp.where(first, dy, 0), jnp.zeros((), dy.dtype), (
          (0, 0, 0), (i, height - i - strides * (out_h - 1) - 1, strides - 1),
          (j, width - j - strides * (out_w - 1) - 1, strides - 1), (0, 0, 0)))
  (top, bottom), (left, right) = padding
  return (dx[:, top:height - bottom, left:width - right, :],)


_max_pool_with_tap_gradient.defvjp(_max_pool_forward, _max_pool_backward)


def max_pool(x, window: int, strides: int, padding: Padding, conv_impl: str):
  """`nn.max_pool` of `x` with explicit paddings ((top, bottom), (left, right)). Where `conv_impl`
  computes with oneDNN (on the CPU), its gradient is computed from the window's taps: XLA's CPU
  gradient of a max pool (a reduce-window over index arrays, then a scatter) costs several times
  the forward pass (docs/performance.md). The same gradient either way."""
  if computes_with_onednn(conv_impl):
    return _max_pool_with_tap_gradient(x, window, strides, tuple(map(tuple, padding)))
  return nn.max_pool(x, (window, window), (strides, strides), padding=padding)


@jax.custom_vjp
def _scale_and_shift(x, mean, var, scale, bias, epsilon):
  """(x - mean) * rsqrt(var + epsilon) * scale + bias over the last axis of `x`. The backward pass
  keeps `x` (the convolution's output, alive anyway), not `x - mean`, which automatic
  differentiation would write out as one more activation-sized array per layer."""
  return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


def _scale_and_shift_forward(x, mean, var, scale, bias, epsilon):
  return _scale_and_shift(x, mean, var, scale, bias, epsilon), (x, mean, var, scale, epsilon)


def _scale_and_shift_backward(residuals, dy):
  x, mean, var, scale, epsilon = residuals
  inverse_std = jax.lax.rsqrt(var + epsilon)
  axes = tuple(range(x.ndim - 1))
  dy_sum = dy.sum(axes)
  dy_x_centered = (dy * (x - mean)).sum(axes)
  return (dy * (inverse_std * scale), -inverse_std * scale * dy_sum,
          -0.5 * scale * inverse_std**3 * dy_x_centered, inverse_std * dy_x_centered, dy_sum,
          jnp.zeros_like(epsilon))


_scale_and_shift.defvjp(_scale_and_shift_forward, _scale_and_shift_backward)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis (the same variables, statistics, running averages and
  outputs) for float32 on the CPU, where its backward pass is the cost: `_scale_and_shift` saves
  one activation-sized array per layer, and XLA's CPU backward of the normalization reads it."""
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  axis_name: Optional[str] = None
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      moments = jnp.stack([x.mean(axes), jnp.square(x).mean(axes)])
      if self.axis_name is not None and not self.is_initializing():
        moments = jax.lax.pmean(moments, self.axis_name)
      mean, var = moments[0], jnp.maximum(0.0, moments[1] - jnp.square(moments[0]))
      if not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    scale = self.param('scale', self.scale_init, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    return _scale_and_shift(x, mean, var, scale, bias,
                            jnp.asarray(self.epsilon, x.dtype)).astype(self.dtype or x.dtype)


def computes_with_onednn(conv_impl: str) -> bool:
  """Whether `conv_impl` resolves to `OneDNNConv` here: the CPU's convolutions, BatchNorm and
  pool gradients."""
  return conv_module(conv_impl) is OneDNNConv


class ConvBN(nn.Module):
  """Convolution -> BatchNorm -> activation (`act=None` for a linear block; `norm=None` for none,
  as Xception's depthwise convolutions and the layers of SqueezeNet, which has no BatchNorm).

  `groups` is the convolution's `feature_group_count`: 1 for a full or pointwise convolution,
  the channel count for a depthwise one (see `depthwise`), g for ShuffleNet's group convolutions.
  `zero_scale` starts the BatchNorm scale at 0 instead of 1 (`Backbone.zero_init_residual`).
  """
  features: int
  kernel_size: int
  conv: ModuleDef
  norm: Optional[ModuleDef]
  padding: Callable[[int], Padding] = same_padding
  strides: int = 1
  groups: int = 1
  act: Optional[Callable[[jnp.ndarray], jnp.ndarray]] = nn.relu
  zero_scale: bool = False

  @nn.compact
  def __call__(self, x):
    x = self.conv(
        self.features, (self.kernel_size, self.kernel_size), (self.strides, self.strides),
        padding=self.padding(self.kernel_size), feature_group_count=self.groups, name='conv')(x)
    if self.norm is not None:
      scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
      x = self.norm(scale_init=scale_init, name='bn')(x)
    return x if self.act is None else self.act(x)


class SqueezeExcitation(nn.Module):
  """Squeeze-and-excitation (Hu et al. 2018, Figure 1): global average pool -> fully connected to
  channels / `reduction` -> ReLU -> fully connected back -> sigmoid, which scales every channel."""
  reduction: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    weights = jnp.mean(x, axis=(1, 2))
    weights = nn.relu(nn.Dense(max(1, channels // self.reduction), dtype=self.dtype,
                               name='reduce')(weights))
    weights = nn.sigmoid(nn.Dense(channels, dtype=self.dtype, name='restore')(weights))
    return x * weights[:, None, None, :]


def depthwise(channels: int, **kwargs) -> dict:
  """Keyword arguments that make a `ConvBN` depthwise over `channels` channels."""
  return dict(features=channels, groups=channels, **kwargs)


class ClassifierHead(nn.Module):
  """Global average pool -> dropout -> fully connected layer (logits in float32)."""
  num_classes: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_kernel_init,
                 name='classifier')(x)
    return jnp.asarray(x, jnp.float32)


class Backbone(nn.Module):
  """Fields and layer defaults shared by every network.

  Subclasses implement `features(x, conv_bn)` returning the last feature map, and list the stride-2
  layers they remove when `small_input` is set (CIFAR-style adaptation, off by default). A network
  without BatchNorm sets `batch_norm = False` (its convolutions get biases); one whose classifier
  is not `ClassifierHead` overrides `head`.
  """
  num_classes: int = 1000
  alpha: float = 1.0
  dropout_rate: float = 0.0
  small_input: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  # 'xla' (nn.Conv, feature_group_count for depthwise and group convolutions), 'shifted'
  # (ShiftedConv), 'onednn' (OneDNNConv, CPU only) or 'auto': onednn on the CPU backend (shifted
  # where the oneDNN library is not built), xla elsewhere. Same parameters, same outputs.
  conv_impl: str = 'auto'
  # Start the last BatchNorm of every branch that is added to an identity shortcut with scale 0,
  # so that each residual block starts as the identity (Goyal et al. 2017, section 5.1). Not in
  # the papers' recipes: it keeps short runs of the wider MobileNet V2 and ShuffleNet from
  # diverging early (configs/quickstart.py). Networks without residual blocks reject it.
  zero_init_residual: bool = False

  # Total stride of the network with and without `small_input`.
  full_stride = 32
  small_input_stride = 8
  padding = staticmethod(same_padding)
  batch_norm = True

  def __post_init__(self):
    if not self.alpha > 0:
      raise ValueError(f'model.alpha must be > 0, got {self.alpha}.')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'model.dropout_rate must be in [0, 1), got {self.dropout_rate}.')
    if not 0.0 <= self.bn_momentum < 1.0:
      raise ValueError(f'model.bn_momentum must be in [0, 1), got {self.bn_momentum}.')
    if not self.bn_epsilon > 0:
      raise ValueError(f'model.bn_epsilon must be > 0, got {self.bn_epsilon}.')
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f"model.conv_impl must be one of {', '.join(CONV_IMPLS)}, got "
                       f'{self.conv_impl!r}.')
    if self.conv_impl == 'onednn' and jax.default_backend() != 'cpu':
      raise ValueError(f"model.conv_impl='onednn' runs on the CPU only, and JAX's default backend "
                       f"is {jax.default_backend()}: use model.conv_impl='auto'.")
    if self.conv_impl == 'onednn' and onednn.load_error():
      raise ValueError(f"model.conv_impl='onednn' needs the oneDNN library, which did not load "
                       f"({onednn.load_error()}): build it with {onednn.BUILD_COMMAND}, or use "
                       "model.conv_impl='auto'.")
    if self.num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {self.num_classes}.')
    super().__post_init__()

  @property
  def total_stride(self) -> int:
    return self.small_input_stride if self.small_input else self.full_stride

  def check_image_size(self, image_size: int):
    """Raises ValueError when the input is smaller than the network's total stride."""
    if image_size < self.total_stride:
      hint = (' or set model.small_input=True' if not self.small_input else '')
      raise ValueError(
          f'image_size={image_size} is too small for {type(self).__name__}, whose total stride is '
          f'{self.total_stride}: use image_size >= {self.total_stride}{hint}.')

  def conv_bn(self, train: bool):
    """`ConvBN` with this network's padding, dtype and BatchNorm settings bound in."""
    conv = functools.partial(conv_module(self.conv_impl), use_bias=not self.batch_norm,
                             dtype=self.dtype, kernel_init=conv_kernel_init)
    # The CPU's BatchNorm where oneDNN computes the convolutions (float32), flax's elsewhere.
    onednn_float32 = computes_with_onednn(self.conv_impl) and self.dtype == jnp.float32
    norm = functools.partial(
        BatchNorm if onednn_float32 else nn.BatchNorm, use_running_average=not train,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
        axis_name=self.axis_name)
    if not self.batch_norm:
      norm = None
    return functools.partial(ConvBN, conv=conv, norm=norm, padding=self.padding)

  def features(self, x, conv_bn):
    raise NotImplementedError

  def head(self, x, conv_bn, train: bool):
    """The logits (float32) of the last feature map."""
    del conv_bn
    return ClassifierHead(self.num_classes, self.dropout_rate, self.dtype, name='head')(x, train)

  @nn.compact
  def __call__(self, x, train: bool):
    self.check_image_size(min(x.shape[1:3]))
    x = jnp.asarray(x, self.dtype)
    conv_bn = self.conv_bn(train)
    return self.head(self.features(x, conv_bn), conv_bn, train)

