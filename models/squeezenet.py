"""SqueezeNet (Iandola et al. 2016, Table 1 and section 6), versions 1.0 and 1.1.

A stem convolution (ReLU), eight Fire modules (fire2-fire9) with three 3x3 stride-2 max pools
between them, dropout, `conv10` (a 1x1 convolution to the classes, ReLU) and global average
pooling; no BatchNorm and no fully connected layer. Every convolution has a bias.

Fire module (section 3.2): a 1x1 "squeeze" convolution to s1x1 channels (ReLU), then 1x1 and 3x3
"expand" convolutions to e1x1 = e3x3 channels each (ReLU), concatenated [1x1, 3x3]. Table 1:
fire2-3 16/64/64, fire4-5 32/128/128, fire6-7 48/192/192, fire8-9 64/256/256.

- `version='1.0'` (Table 1, the official `SqueezeNet_v1.0/train_val.prototxt`): conv1 96 7x7/2,
  max pools after conv1, fire4 and fire8. 1,248,424 parameters at 1000 classes.
- `version='1.1'` (the official `SqueezeNet_v1.1/README.md`): conv1 64 3x3/2, max pools after
  conv1, fire3 and fire5. 1,235,496 parameters.

Both follow the official Caffe files where the paper is silent: convolutions without padding except
the 3x3 expands (padding 1), and max pools that round their output size up (Caffe's rule;
torchvision and pytorchcv use `ceil_mode=True`), implemented here by padding the bottom and right
(`ceil_max_pool`). The v1.0 prototxt pads `conv10`, a 1x1 convolution, by 1: that only adds a border
of constant outputs ReLU(bias) to the global average, and v1.1, torchvision and pytorchcv do not
have it, so `conv10` is unpadded in both versions.

Section 6's bypass variants (Figure 2, Table 3) are settings of the same network:
- `bypass='simple'` adds each Fire module's input to its output around fire3, fire5, fire7 and
  fire9, the modules whose input and output widths agree (pytorchcv's `squeezeresnet_v1_0`).
- `bypass='complex'` also adds bypasses around fire2, fire4, fire6 and fire8 through a 1x1
  convolution (with bias, no activation) to the module's output width. The paper says only that
  "complex bypass connections ... include a 1x1 convolution layer with the number of filters set
  equal to the number of output channels"; its Figure 2 draws them on exactly these four modules. It
  gives the model 7.7 MB against 4.8 MB, which no reading reproduces: these four convolutions add
  341,248 parameters in v1.0 (1.30 MiB; 337,152 in v1.1), bypasses with 1x1 convolutions on all
  eight Fire modules would add 834,048 (3.18 MiB), and 7.7 - 4.8 MB is about 760,000 float32
  parameters.
"""

import flax.linen as nn
import jax.numpy as jnp

from models import layers

# (squeeze channels, expand channels of each of the 1x1 and 3x3 branches) of fire2..fire9, Table 1.
FIRE_MODULES = ((16, 64), (16, 64), (32, 128), (32, 128), (48, 192), (48, 192), (64, 256),
                (64, 256))
# (stem channels, stem kernel size, the Fire modules after which a max pool follows; 1 = conv1).
VERSIONS = {'1.0': (96, 7, (1, 4, 8)), '1.1': (64, 3, (1, 3, 5))}
BYPASSES = ('none', 'simple', 'complex')
SIMPLE_BYPASS_MODULES = (3, 5, 7, 9)


def ceil_max_pool(x):
  """3x3 stride-2 max pool whose output size is rounded up (Caffe). The input is padded at the
  bottom and right with copies of its last row and column, which the last window holds already,
  so the maxima are unchanged (and an int8 export sees no -inf)."""
  pads = [(0, 0)]
  for size in x.shape[1:3]:
    out = -(-(size - 3) // 2) + 1
    pads.append((0, max(0, (out - 1) * 2 + 3 - size)))
  x = jnp.pad(x, pads + [(0, 0)], mode='edge')
  return nn.max_pool(x, (3, 3), (2, 2))


class Fire(nn.Module):
  """Section 3.2's Fire module, with section 6's bypass: 'none', 'simple' (identity) or 'complex'
  (a 1x1 convolution)."""
  squeeze: int
  expand: int
  conv_bn: layers.ModuleDef
  bypass: str = 'none'

  @nn.compact
  def __call__(self, x):
    y = self.conv_bn(self.squeeze, 1, name='squeeze')(x)
    y = jnp.concatenate([self.conv_bn(self.expand, 1, name='expand1x1')(y),
                         self.conv_bn(self.expand, 3, name='expand3x3')(y)], axis=-1)
    if self.bypass == 'simple':
      return y + x
    if self.bypass == 'complex':
      return y + self.conv_bn(2 * self.expand, 1, act=None, name='bypass')(x)
    return y


class SqueezeNetHead(nn.Module):
  """Dropout -> conv10 (1x1 to the classes, ReLU) -> global average pool (logits in float32)."""
  num_classes: int
  dropout_rate: float
  conv: layers.ModuleDef

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # Caffe and torchvision initialise conv10 with a Gaussian of std 0.01.
    x = self.conv(self.num_classes, (1, 1), padding='VALID',
                  kernel_init=nn.initializers.normal(0.01), name='classifier')(x)
    return jnp.asarray(jnp.mean(nn.relu(x), axis=(1, 2)), jnp.float32)


class SqueezeNet(layers.Backbone):
  """SqueezeNet; see the module docstring."""
  version: str = '1.0'
  bypass: str = 'none'
  dropout_rate: float = 0.5
  padding = staticmethod(layers.symmetric_padding)
  batch_norm = False

  def __post_init__(self):
    if self.version not in VERSIONS:
      raise ValueError(f'model.version must be one of {", ".join(VERSIONS)} (SqueezeNet), got '
                       f'{self.version!r}.')
    if self.bypass not in BYPASSES:
      raise ValueError(f'model.bypass must be one of {", ".join(BYPASSES)} (SqueezeNet section '
                       f'6), got {self.bypass!r}.')
    if self.alpha != 1.0:
      raise ValueError(f'SqueezeNet has no width multiplier: leave model.alpha at 1.0, got '
                       f'{self.alpha}.')
    if self.small_input or self.zero_init_residual:
      raise ValueError('SqueezeNet has no small_input adaptation and no BatchNorm for '
                       'zero_init_residual: leave model.small_input and '
                       'model.zero_init_residual False.')
    super().__post_init__()

  def output_size(self, image_size: int) -> int:
    """The side of the last feature map (conv10's) for an input of image_size."""
    _, kernel, _ = VERSIONS[self.version]
    size = (image_size - kernel) // 2 + 1
    for _ in range(3):
      size = -(-(size - 3) // 2) + 1
    return size

  def check_image_size(self, image_size: int):
    """ValueError when an image_size leaves no feature map for a max pool or conv10."""
    smallest = next(s for s in range(1, 1024) if self.output_size(s) >= 1)
    if image_size < smallest:
      raise ValueError(f'image_size={image_size} is too small for SqueezeNet {self.version}: '
                       f'use image_size >= {smallest}.')

  def features(self, x, conv_bn):
    stem, kernel, pools_after = VERSIONS[self.version]
    x = conv_bn(stem, kernel, strides=2, padding=layers.valid_padding, name='conv1')(x)
    x = ceil_max_pool(x)
    for number, (squeeze, expand) in enumerate(FIRE_MODULES, start=2):
      bypass = self.bypass
      if bypass != 'none' and number in SIMPLE_BYPASS_MODULES:
        bypass = 'simple'
      elif bypass == 'simple':
        bypass = 'none'
      x = Fire(squeeze, expand, conv_bn, bypass, name=f'fire{number}')(x)
      if number in pools_after:
        x = ceil_max_pool(x)
    return x

  def head(self, x, conv_bn, train: bool):
    return SqueezeNetHead(self.num_classes, self.dropout_rate, conv_bn.keywords['conv'],
                          name='head')(x, train)
