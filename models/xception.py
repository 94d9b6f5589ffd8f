"""Xception (Chollet 2017, Figure 5): depthwise separable convolutions with residual connections.

Entry flow: two 3x3 convolutions (32 stride 2 and 64, unpadded), then three blocks (128, 256 and
728 channels) of [ReLU] SeparableConv -> BN -> ReLU -> SeparableConv -> BN -> 3x3 stride-2 max pool,
each added to a strided 1x1 convolution (-> BN) of its input; the first block starts without the
ReLU. Middle flow: eight blocks x + (ReLU -> SeparableConv 728 -> BN) x 3. Exit flow: the same
strided block with 728 and 1024 channels, then SeparableConv 1536 -> BN -> ReLU -> SeparableConv
2048 -> BN -> ReLU, global average pooling and the classifier (the paper's logistic regression,
with dropout 0.5 before it on ImageNet, section 4.3: `dropout_rate`).

A SeparableConv is a 3x3 depthwise convolution followed directly by a 1x1 convolution, with no
BatchNorm or activation between them (section 3: "the absence of any non-linearity" between the
two works best, Figure 10). Convolutions have no bias; padding is TensorFlow's 'SAME' except the
first two. The residual adds and the block order follow Keras applications' `Xception`, written
by the paper's author: 22,855,952 trainable parameters at 299 px and 1000 classes (Table 3), plus
54,528 BatchNorm statistics.
"""

import functools

import flax.linen as nn

from models import layers

ENTRY_STEM = (32, 64)
# Output channels of the strided blocks of the entry flow (blocks 2-4), Figure 5.
ENTRY_BLOCKS = (128, 256, 728)
MIDDLE_BLOCKS = 8
MIDDLE_CHANNELS = 728
# The exit flow's strided block (block 13: two SeparableConvs) and its last two (block 14).
EXIT_BLOCK = (728, 1024)
EXIT_CONVS = (1536, 2048)


class SeparableConvBN(nn.Module):
  """3x3 depthwise convolution -> 1x1 convolution -> BN, no activation (section 3)."""
  features: int
  conv_bn: layers.ModuleDef

  @nn.compact
  def __call__(self, x):
    x = self.conv_bn(kernel_size=3, norm=None, act=None, name='depthwise',
                     **layers.depthwise(x.shape[-1]))(x)
    return self.conv_bn(self.features, 1, act=None, name='pointwise')(x)


class StridedBlock(nn.Module):
  """[ReLU] SeparableConv -> BN -> ReLU -> SeparableConv -> BN -> max pool 3x3/2, plus a 1x1
  stride-2 convolution -> BN of the input (the entry flow's blocks and the exit flow's first)."""
  features: tuple[int, int]
  conv_bn: layers.ModuleDef
  start_with_relu: bool = True

  @nn.compact
  def __call__(self, x):
    shortcut = self.conv_bn(self.features[1], 1, strides=2, act=None, name='shortcut')(x)
    if self.start_with_relu:
      x = nn.relu(x)
    x = SeparableConvBN(self.features[0], self.conv_bn, name='sepconv1')(x)
    x = SeparableConvBN(self.features[1], self.conv_bn, name='sepconv2')(nn.relu(x))
    return nn.max_pool(x, (3, 3), (2, 2), padding='SAME') + shortcut


class MiddleBlock(nn.Module):
  """x + (ReLU -> SeparableConv -> BN) x 3, the middle flow's block."""
  conv_bn: layers.ModuleDef

  @nn.compact
  def __call__(self, x):
    y = x
    for i in range(1, 4):
      y = SeparableConvBN(x.shape[-1], self.conv_bn, name=f'sepconv{i}')(nn.relu(y))
    return x + y


class Xception(layers.Backbone):
  """Xception; see the module docstring."""
  dropout_rate: float = 0.5

  def __post_init__(self):
    if self.alpha != 1.0:
      raise ValueError(f'Xception has no width multiplier: leave model.alpha at 1.0, got '
                       f'{self.alpha}.')
    if self.small_input or self.zero_init_residual:
      raise ValueError('Xception has no small_input adaptation and no zero_init_residual: '
                       'leave model.small_input and model.zero_init_residual False.')
    super().__post_init__()

  def features(self, x, conv_bn):
    unpadded = functools.partial(conv_bn, padding=layers.valid_padding)
    x = unpadded(ENTRY_STEM[0], 3, strides=2, name='block1_conv1')(x)
    x = unpadded(ENTRY_STEM[1], 3, name='block1_conv2')(x)
    for block, channels in enumerate(ENTRY_BLOCKS, start=2):
      x = StridedBlock((channels, channels), conv_bn, start_with_relu=block > 2,
                       name=f'block{block}')(x)
    for block in range(5, 5 + MIDDLE_BLOCKS):
      x = MiddleBlock(conv_bn, name=f'block{block}')(x)
    x = StridedBlock(EXIT_BLOCK, conv_bn, name=f'block{5 + MIDDLE_BLOCKS}')(x)
    for i, channels in enumerate(EXIT_CONVS, start=1):
      name = f'block{6 + MIDDLE_BLOCKS}_sepconv{i}'
      x = nn.relu(SeparableConvBN(channels, conv_bn, name=name)(x))
    return x
