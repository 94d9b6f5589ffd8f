"""ShuffleNet v1 (Zhang et al. 2017, Table 1 and Figure 2).

A 3x3 stride-2 convolution (24 channels) and a 3x3 stride-2 max pool, three stages of ShuffleNet
units (1 + 3, 1 + 7 and 1 + 3 units; the first of each has stride 2), global average pooling and the
classifier. Convolutions use Caffe/PyTorch symmetric padding, as the original implementation.

Widths: the stage outputs of Table 1 for g groups, multiplied by the scale factor s ("ShuffleNet
s x"); the bottleneck of every unit is a quarter of the unit's output width. The 24-channel stem is
scaled by s up to 1x and by floor(s) above (int(24 * s) for 0.25x, 0.5x and 1x; 24 for 1.5x, 48 for
2x), as in the official implementation: this is what gives Table 5's 292 MFLOPs for 1.5x (g = 3),
where scaling the stem to 36 would give 300 MFLOPs. Where a scaled width does not divide into g
groups as the group convolutions and the shuffle require, it is rounded to the nearest multiple of
g (ties up): the stem, each stage width and each bottleneck independently. Every width of Table
1, and of the 1x, 0.5x and 0.25x networks with g = 1 and g = 3, is a multiple already and stays as
published; e.g. g = 4 at 0.25x has stem 8 (not 6) and a first-stage bottleneck of 16 (not 17).

Stride-2 units concatenate the pooled shortcut before the branch, as the official release
(megvii-model/ShuffleNet-Series) does. `shortcut_first=False` puts the branch first, as pytorchcv
does; because the next unit's group convolutions split the channels in order, the two orders are
different networks, so weights converted from pytorchcv need it.

The ablations of Tables 3 and 5 are settings of the same network:
- `channel_shuffle=False` removes the shuffle (Table 3, "no shuffle").
- `shallow=True` is Table 5's "ShuffleNet 0.5x (shallow, g = 3)": "a 26-layer architecture by
  removing half of the blocks in Stage 2-4" (section 4.3), i.e. 1 + 1, 1 + 3 and 1 + 1 units. The
  paper gives its complexity, 40 MFLOPs, but not its width; at s = 0.5 the 26 layers cost 21.6 M,
  so the widths were evidently raised to keep the complexity of the 50-layer 0.5x (38 M). Halving
  the depth at equal cost takes sqrt(2) times the width, s = 0.5 * sqrt(2) ~ 0.71, which gives
  40.3 M: configs/sweeps/shufflenet_table5.py uses `alpha=0.71` for this row.
- `se_reduction=r` adds a squeeze-and-excitation module (Hu et al. 2018) with reduction ratio r to
  every unit: Table 5's "ShuffleNet 2x (with SE, g = 3)", 527 MFLOPs. The paper gives neither its
  position nor r. Here it follows SE-ResNet (Hu et al., Figure 3) with SENet's r = 16: on the
  residual branch before the addition in stride-1 units, and on the concatenation (before the
  ReLU) in stride-2 units, so that it weighs all of the unit's output channels. That placement
  gives 526.9 M, the published 527; weighing only the branch of stride-2 units would give 526.5 M.
"""

import functools
import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from models import layers

STEM_CHANNELS = 24
# Output channels of Stages 2, 3 and 4 for each number of groups g, Table 1.
STAGE_CHANNELS = {
    1: (144, 288, 576),
    2: (200, 400, 800),
    3: (240, 480, 960),
    4: (272, 544, 1088),
    8: (384, 768, 1536),
}
STAGE_UNITS = (4, 8, 4)
BOTTLENECK_RATIO = 4


class ShuffleUnit(nn.Module):
  """Figure 2 (b) with stride 1, (c) with stride 2.

  1x1 group conv -> BN -> ReLU -> channel shuffle -> 3x3 depthwise conv (stride 1 or 2) -> BN ->
  1x1 group conv -> BN; then ReLU(x + branch), or, with stride 2, ReLU(concat(avg_pool(x), branch))
  where the branch produces only the channels the shortcut lacks. `shuffle=False` leaves the
  shuffle out; `squeeze_excitation` (a module) weighs the branch, or with stride 2 the
  concatenation, before the ReLU.
  """
  features: int
  bottleneck: int
  groups: int
  strides: int
  conv_bn: layers.ModuleDef
  group_first_conv: bool = True
  shortcut_first: bool = True
  zero_init_residual: bool = False
  shuffle: bool = True
  squeeze_excitation: Optional[layers.ModuleDef] = None
  conv_impl: str = 'auto'  # Backbone.conv_impl, which also computes the shortcut's average pool

  @nn.compact
  def __call__(self, x):
    in_channels = x.shape[-1]
    branch_channels = self.features - in_channels if self.strides == 2 else self.features
    y = self.conv_bn(self.bottleneck, 1, groups=self.groups if self.group_first_conv else 1,
                     act=nn.relu, name='compress')(x)
    if self.shuffle:
      y = layers.channel_shuffle(y, self.groups)
    y = self.conv_bn(kernel_size=3, strides=self.strides, act=None, name='depthwise',
                     **layers.depthwise(self.bottleneck))(y)
    y = self.conv_bn(branch_channels, 1, groups=self.groups, act=None,
                     zero_scale=self.zero_init_residual and self.strides == 1, name='expand')(y)
    if self.strides == 1:
      if self.squeeze_excitation:
        y = self.squeeze_excitation(name='se')(y)
      return nn.relu(x + y)
    # Zero padding counted in the average (PyTorch's default).
    shortcut = layers.average_pool(x, 3, 2, 1, self.conv_impl)
    parts = [shortcut, y] if self.shortcut_first else [y, shortcut]
    y = jnp.concatenate(parts, axis=-1)
    if self.squeeze_excitation:
      y = self.squeeze_excitation(name='se')(y)
    return nn.relu(y)


def check_groups(groups: int):
  if groups not in STAGE_CHANNELS:
    raise ValueError(f'model.groups must be one of {sorted(STAGE_CHANNELS)} (ShuffleNet Table 1), '
                     f'got {groups}.')


def stage_widths(groups: int, scale: float) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
  """(stem width, stage output widths, stage bottleneck widths) for g groups at scale s."""
  check_groups(groups)
  stem_scale = scale if scale <= 1 else math.floor(scale)
  stem = layers.round_to_multiple(int(STEM_CHANNELS * stem_scale), groups)
  outputs = tuple(layers.round_to_multiple(int(c * scale), groups) for c in STAGE_CHANNELS[groups])
  bottlenecks = tuple(layers.round_to_multiple(c // BOTTLENECK_RATIO, groups) for c in outputs)
  return stem, outputs, bottlenecks


class ShuffleNet(layers.Backbone):
  """ShuffleNet v1 with g groups at scale s (`alpha`); see the module docstring."""
  groups: int = 3
  shortcut_first: bool = True
  channel_shuffle: bool = True
  shallow: bool = False
  se_reduction: int = 0  # 0: no squeeze-and-excitation; r: reduction ratio (SENet: 16)
  padding = staticmethod(layers.symmetric_padding)

  def __post_init__(self):
    check_groups(self.groups)
    if self.se_reduction < 0:
      raise ValueError(f'model.se_reduction must be 0 (no squeeze-and-excitation) or a reduction '
                       f'ratio >= 1, got {self.se_reduction}.')
    super().__post_init__()

  @property
  def stage_units(self) -> tuple[int, ...]:
    return tuple(units // 2 for units in STAGE_UNITS) if self.shallow else STAGE_UNITS

  def features(self, x, conv_bn):
    stem, outputs, bottlenecks = stage_widths(self.groups, self.alpha)
    # `small_input` drops the stride of the stem and the max pool.
    x = conv_bn(stem, 3, strides=1 if self.small_input else 2, act=nn.relu, name='stem')(x)
    if not self.small_input:
      x = layers.max_pool(x, 3, 2, layers.symmetric_padding(3), self.conv_impl)
    squeeze_excitation = None
    if self.se_reduction:
      squeeze_excitation = functools.partial(layers.SqueezeExcitation, self.se_reduction,
                                             dtype=self.dtype)
    for stage, (units, width, bottleneck) in enumerate(
        zip(self.stage_units, outputs, bottlenecks)):
      for unit in range(units):
        x = ShuffleUnit(width, bottleneck, self.groups, strides=2 if unit == 0 else 1,
                        conv_bn=conv_bn, group_first_conv=not (stage == 0 and unit == 0),
                        shortcut_first=self.shortcut_first,
                        zero_init_residual=self.zero_init_residual,
                        shuffle=self.channel_shuffle, squeeze_excitation=squeeze_excitation,
                        conv_impl=self.conv_impl,
                        name=f'stage{stage + 2}_unit{unit + 1}')(x)
    return x
