"""MobileNet V2 (Sandler et al. 2018, Tables 1 and 2).

A 3x3 stride-2 convolution, 17 inverted-residual blocks, a 1x1 convolution to 1280 channels, global
average pooling and the classifier. Widths follow the reference implementations: `make_divisible`
(multiples of 8) on the stem, on every block output and on the expansion width; the last 1x1
convolution stays 1280 wide for alpha <= 1 and is scaled only for alpha > 1.
"""

import flax.linen as nn

from models import layers

STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# (expansion t, output channels c, repeats n, first stride s), Table 2.
BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
  """Table 1: 1x1 expansion -> 3x3 depthwise -> linear 1x1 projection, with a residual add
  when the stride is 1 and the input and output widths match. No expansion when t = 1."""
  features: int
  expansion: int
  strides: int
  conv_bn: layers.ModuleDef
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    in_channels = x.shape[-1]
    hidden = layers.make_divisible(in_channels * self.expansion)
    residual = self.strides == 1 and in_channels == self.features
    y = x
    if self.expansion != 1:
      y = self.conv_bn(hidden, 1, act=nn.relu6, name='expand')(y)
    y = self.conv_bn(kernel_size=3, strides=self.strides, act=nn.relu6, name='depthwise',
                     **layers.depthwise(hidden))(y)
    y = self.conv_bn(self.features, 1, act=None, zero_scale=self.zero_init_residual and residual,
                     name='project')(y)
    return y + x if residual else y


class MobileNetV2(layers.Backbone):
  """MobileNet V2; see the module docstring."""

  def features(self, x, conv_bn):
    # `small_input` keeps the full resolution through the stem and the first stride-2 stage.
    first_stride = 1 if self.small_input else 2
    x = conv_bn(layers.make_divisible(STEM_CHANNELS * self.alpha), 3, strides=first_stride,
                act=nn.relu6, name='stem')(x)
    index = 0
    for stage, (expansion, channels, repeats, stride) in enumerate(BLOCKS):
      if self.small_input and stage == 1:
        stride = 1
      for repeat in range(repeats):
        x = InvertedResidual(layers.make_divisible(channels * self.alpha), expansion,
                             stride if repeat == 0 else 1, conv_bn, self.zero_init_residual,
                             name=f'block{index}')(x)
        index += 1
    last = LAST_CHANNELS if self.alpha <= 1.0 else layers.make_divisible(LAST_CHANNELS * self.alpha)
    return conv_bn(last, 1, act=nn.relu6, name='last_conv')(x)
