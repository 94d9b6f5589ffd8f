"""Convolutions on the CPU through oneDNN, PyTorch's CPU kernels, as XLA FFI calls.

XLA's CPU backend computes a depthwise convolution's gradients, above all the kernel gradient,
several times slower than oneDNN's direct depthwise kernels (docs/performance.md). The handlers in
`native/conv_onednn.cc` run oneDNN's forward pass, input gradient and kernel gradient of a
(grouped) convolution on NHWC float32 arrays, with the batch split among the threads of XLA's own
intra-op thread pool (`threads_per_call`); `conv` calls them with a `custom_vjp`. `setup.sh`
builds the library (`bash models/native/build.sh`); where it is missing or does not load, `available()` is False and
says why in one warning line, and the networks compute with XLA instead (`layers.ShiftedConv`).
"""

import ctypes
import functools
import os
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'native', 'build',
                       'libconv_onednn.so')
BUILD_COMMAND = 'bash models/native/build.sh'
# FFI target name -> the library's handler symbol.
TARGETS = {
    'conv_onednn_forward': 'ConvForward',
    'conv_onednn_input_gradient': 'ConvInputGradient',
    'conv_onednn_kernel_gradient': 'ConvKernelGradient',
}
PASSES = ('forward', 'input_gradient', 'kernel_gradient')
Padding = tuple[tuple[int, int], tuple[int, int]]


@functools.cache
def library() -> ctypes.CDLL:
  """The library, loaded once (OSError where it is missing or does not load)."""
  return ctypes.CDLL(LIBRARY)


@functools.cache
def load_error() -> str:
  """Loads and registers the library once: '' when it is usable, otherwise why not."""
  try:
    handlers = library()
  except OSError as e:
    return f'{e}'
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handlers, symbol)),
                                platform='cpu')
  return ''


@functools.cache
def available() -> bool:
  """Whether the oneDNN convolutions can be used; the first False logs one warning line."""
  error = load_error()
  if error:
    logging.warning("oneDNN convolutions unavailable (%s); using XLA's, slower on the CPU. "
                    'Build them with: %s', error, BUILD_COMMAND)
  return not error


def output_shape(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
                 padding: Padding) -> tuple[int, int, int, int]:
  (n, h, w, _), (kh, kw, _, out_channels) = x_shape, kernel_shape
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  return (n, (h + pad_top + pad_bottom - kh) // strides[0] + 1,
          (w + pad_left + pad_right - kw) // strides[1] + 1, out_channels)


def threads_per_call() -> int:
  """The most threads one call splits its batch among: the cores XLA was given, shared among the
  local devices, which run their steps at the same time (8 simulated devices on 2 cores: 1)."""
  return max(1, len(os.sched_getaffinity(0)) // jax.local_device_count())


def _call(pass_name: str, result_shape: Sequence[int], *operands, strides, padding, groups):
  if load_error():
    raise RuntimeError(f'The oneDNN convolutions did not load ({load_error()}): build them with '
                       f'{BUILD_COMMAND}.')
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  return jax.ffi.ffi_call(
      f'conv_onednn_{pass_name}', jax.ShapeDtypeStruct(tuple(result_shape), jnp.float32),
      vmap_method='sequential')(
          *operands, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
          pad_top=np.int64(pad_top), pad_bottom=np.int64(pad_bottom),
          pad_left=np.int64(pad_left), pad_right=np.int64(pad_right), groups=np.int64(groups),
          max_threads=np.int64(threads_per_call()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: jnp.ndarray, kernel: jnp.ndarray, strides: tuple[int, int], padding: Padding,
         groups: int) -> jnp.ndarray:
  """`lax.conv_general_dilated(x, kernel, strides, padding, feature_group_count=groups)` for NHWC
  float32 `x` and a (kh, kw, IC / groups, OC) kernel, computed by oneDNN."""
  return _call('forward', output_shape(x.shape, kernel.shape, strides, padding), x, kernel,
               strides=strides, padding=padding, groups=groups)


def _forward(x, kernel, strides, padding, groups):
  return conv(x, kernel, strides, padding, groups), (x, kernel)


def _backward(strides, padding, groups, residuals, dy):
  x, kernel = residuals
  settings = dict(strides=strides, padding=padding, groups=groups)
  return (_call('input_gradient', x.shape, dy, kernel, **settings),
          _call('kernel_gradient', kernel.shape, x, dy, **settings))


conv.defvjp(_forward, _backward)


def implementation(pass_name: str, x_shape: Sequence[int], kernel_shape: Sequence[int],
                   strides: Sequence[int], padding: Padding, groups: int) -> str:
  """The oneDNN implementation that a pass ('forward', 'input_gradient' or 'kernel_gradient') of
  this convolution runs on one thread, e.g. 'jit_dw:avx512_core' or 'brgconv_1x1:avx2'."""
  if not available():
    return 'unavailable'
  n, h, w, in_channels = x_shape
  kh, kw, _, out_channels = kernel_shape
  _, oh, ow, _ = output_shape(x_shape, kernel_shape, strides, padding)
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  sizes = (ctypes.c_int64 * 16)(n, h, w, in_channels, out_channels, groups, kh, kw, oh, ow,
                                *strides, pad_top, pad_bottom, pad_left, pad_right)
  function = library().ConvImplementation
  function.restype = ctypes.c_char_p
  return function(ctypes.c_int64(PASSES.index(pass_name)), sizes).decode()
