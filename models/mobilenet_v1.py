"""MobileNet V1 (Howard et al. 2017, Table 1).

A 3x3 stride-2 convolution followed by 13 depthwise-separable blocks (3x3 depthwise -> BN -> ReLU6
-> 1x1 pointwise -> BN -> ReLU6), global average pooling and the classifier. The width multiplier
alpha scales every convolution, the stem and the last 1024-wide pointwise included, with the
TF-slim rule `max(int(c * alpha), min_depth)`; depthwise convolutions keep their input's channels.
"""

import flax.linen as nn

from models import layers

# (stride of the depthwise convolution, output channels of the pointwise convolution), Table 1.
STEM_CHANNELS = 32
BLOCKS = (
    (1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
    (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024),
)


class MobileNetV1(layers.Backbone):
  """MobileNet V1; see the module docstring."""
  min_depth: int = 8

  def __post_init__(self):
    if self.zero_init_residual:
      raise ValueError('model.zero_init_residual applies to networks with residual blocks '
                       '(mobilenet_v2, shufflenet); MobileNet V1 has none: leave it unset.')
    super().__post_init__()

  def width(self, channels: int) -> int:
    return max(int(channels * self.alpha), self.min_depth)

  def features(self, x, conv_bn):
    act = nn.relu6
    # `small_input` keeps the full resolution through the stem and the first stride-2 block.
    strides = [2] + [s for s, _ in BLOCKS]
    if self.small_input:
      strides[0], strides[2] = 1, 1
    x = conv_bn(self.width(STEM_CHANNELS), 3, strides=strides[0], act=act, name='stem')(x)
    for i, ((_, channels), stride) in enumerate(zip(BLOCKS, strides[1:]), start=1):
      x = conv_bn(kernel_size=3, strides=stride, act=act, name=f'block{i}_depthwise',
                  **layers.depthwise(x.shape[-1]))(x)
      x = conv_bn(self.width(channels), 1, act=act, name=f'block{i}_pointwise')(x)
    return x
