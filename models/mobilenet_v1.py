"""MobileNet V1 (Howard et al. 2017, Table 1).

A 3x3 stride-2 convolution followed by 13 depthwise-separable blocks (3x3 depthwise -> BN -> ReLU6
-> 1x1 pointwise -> BN -> ReLU6), global average pooling and the classifier. The width multiplier
alpha scales every convolution, the stem and the last 1024-wide pointwise included, with the
TF-slim rule `max(int(c * alpha), min_depth)`; depthwise convolutions keep their input's channels.

Two ablations of the paper are settings of the same network:
- `separable=False` is Table 4's "Conv MobileNet": every separable block becomes one full 3x3
  convolution (-> BN -> ReLU6) with the block's stride and output width (4866 M MAdds, 29.3 M).
- `shallow=True` is Table 5's "Shallow MobileNet": the five separable blocks at 14 x 14 x 512
  (blocks 7-11) are removed (307 M MAdds, 2.9 M parameters). The other blocks keep their names.
"""

import flax.linen as nn

from models import layers

# (stride of the depthwise convolution, output channels of the pointwise convolution), Table 1.
STEM_CHANNELS = 32
BLOCKS = (
    (1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
    (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024),
)
# The "5 x Conv dw / s1, Conv / s1" rows of Table 1 at 14 x 14 x 512, which Table 5 removes.
SHALLOW_REMOVED_BLOCKS = (7, 8, 9, 10, 11)


class MobileNetV1(layers.Backbone):
  """MobileNet V1; see the module docstring."""
  min_depth: int = 8
  separable: bool = True
  shallow: bool = False

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
      if self.shallow and i in SHALLOW_REMOVED_BLOCKS:
        continue
      if not self.separable:
        x = conv_bn(self.width(channels), 3, strides=stride, act=act, name=f'block{i}_conv')(x)
        continue
      x = conv_bn(kernel_size=3, strides=stride, act=act, name=f'block{i}_depthwise',
                  **layers.depthwise(x.shape[-1]))(x)
      x = conv_bn(self.width(channels), 1, act=act, name=f'block{i}_pointwise')(x)
    return x
