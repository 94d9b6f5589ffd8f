"""The other structures of ShuffleNet's Table 4 (Zhang et al. 2017, section 4.2).

"We use the overall network architecture as shown in Table 1. We replace the ShuffleNet units in
Stage 2-4 with other structures, then adapt the number of channels to ensure the complexity remains
unchanged." Each network here is ShuffleNet s x's layout (`models/shufflenet.py`: the 3x3 stride-2
stem of int(24 s) channels, the max pool, Stages 2-4 of 1 + 3, 1 + 7 and 1 + 3 units at 28, 14 and 7
px, global pool, classifier) with one of these units:
- `table4_vgg` (VGG-like): 3x3 conv (the unit's stride) -> BN -> ReLU -> 3x3 conv -> BN -> ReLU; no
  shortcut ("two-layer 3x3 convolutions ... we add a Batch Normalization layer after each").
- `table4_resnet` (ResNet, "bottleneck ratio 1 : 4"): 1x1 conv to C / 4 -> BN -> ReLU -> 3x3 conv
  (the unit's stride) -> BN -> ReLU -> 1x1 conv to C -> BN, added to the shortcut, ReLU.
- `table4_resnext` (ResNeXt, "cardinality = 16 and bottleneck ratio = 1 : 2"): the same with C / 2
  bottleneck channels (rounded to a multiple of 16) and a 3x3 convolution of 16 groups.
The fourth structure, Xception-like ("the same as ShuffleNet but without pointwise group
convolutions and shuffle"), is ShuffleNet with g = 1 (`shufflenet`, `groups=1`): Table 4's
Xception-like errors are Table 2's g = 1 errors.

`alpha` is the ShuffleNet scale of the same complexity: 1 (140 MFLOPs), 0.5 (38) or 0.25 (13); the
paper reports VGG-like at 140 only ("the accuracy is significantly worse" below). The paper gives
neither the stride-2 shortcuts nor the widths except one check, "in the 38 MFLOPs level, output
channels of Stage 4 ... for VGG-like, ResNet, ResNeXt, Xception-like ... are 50, 192, 192, 288".
Here:
- A stride-2 unit of ResNet and ResNeXt has the shortcut of those papers, a 1x1 stride-2 convolution
  -> BN (He et al. 2016, option B); the stride is on the 3x3 convolution, as in the ShuffleNet unit;
  a VGG-like unit has no shortcut.
- The stem follows ShuffleNet s x (24, 12 and 6 channels), the stages double (C / 4, C / 2, C for
  the Stage 4 width C), and C is the width whose complexity is nearest the level's in ratio (the
  levels 140, 38 and 13 are a geometric series), on a grid that keeps every layer whole: multiples
  of 16 for ResNet (Stage 2's bottleneck is C / 16), of 32 for ResNeXt (Stage 4's bottleneck splits
  into 16 groups), of 2 for VGG-like.
This rule gives the paper's 50, 192 and 192 at 38 MFLOPs, and Xception-like is ShuffleNet g = 1 at
0.5x, whose Stage 4 has the paper's 288. MFLOPs reached (tests/test_seed_networks.py checks the
rule; docs/complexity.md lists them): VGG-like 138.1, 37.6, 12.7; ResNet 144.0, 38.1, 13.6;
ResNeXt 142.2, 44.5, 13.9 (its grid's other neighbour at 38, C = 160, gives 31.6).
"""

import flax.linen as nn
import jax.numpy as jnp

from models import layers

STEM_CHANNELS = 24
STAGE_UNITS = (4, 8, 4)
RESNET_BOTTLENECK_RATIO = 4
RESNEXT_BOTTLENECK_RATIO = 2
RESNEXT_CARDINALITY = 16
# The Stage 4 width C of each structure at each complexity level (alpha: 1 = 140, 0.5 = 38,
# 0.25 = 13 MFLOPs), derived as the module docstring says; Stages 2 and 3 have C / 4 and C / 2.
STAGE4_CHANNELS = {
    'vgg': {1.0: 98, 0.5: 50, 0.25: 28},
    'resnet': {1.0: 384, 0.5: 192, 0.25: 112},
    'resnext': {1.0: 352, 0.5: 192, 0.25: 96},
}
# Stage 4 widths are chosen on these grids (every width and group stays whole).
WIDTH_GRID = {'vgg': 2, 'resnet': 16, 'resnext': 32}
COMPLEXITY_MFLOPS = {1.0: 140, 0.5: 38, 0.25: 13}


class VGGUnit(nn.Module):
  """Two 3x3 convolutions, each -> BN -> ReLU; the first has the unit's stride."""
  features: int
  strides: int
  conv_bn: layers.ModuleDef

  @nn.compact
  def __call__(self, x):
    x = self.conv_bn(self.features, 3, strides=self.strides, name='conv1')(x)
    return self.conv_bn(self.features, 3, name='conv2')(x)


class BottleneckUnit(nn.Module):
  """ResNet's bottleneck (groups = 1) or ResNeXt's (groups = cardinality): 1x1 -> 3x3 (stride,
  groups) -> 1x1, each -> BN, ReLUs between, plus the identity or a 1x1 strided projection -> BN,
  then ReLU. `zero_init_residual` starts the last BN's scale at 0."""
  features: int
  bottleneck: int
  groups: int
  strides: int
  conv_bn: layers.ModuleDef
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = self.conv_bn(self.features, 1, strides=self.strides, act=None,
                              name='projection')(x)
    y = self.conv_bn(self.bottleneck, 1, name='compress')(x)
    y = self.conv_bn(self.bottleneck, 3, strides=self.strides, groups=self.groups, name='conv')(y)
    y = self.conv_bn(self.features, 1, act=None, zero_scale=self.zero_init_residual,
                     name='expand')(y)
    return nn.relu(shortcut + y)


def stage_widths(unit: str, alpha: float) -> tuple[int, int, int]:
  """The output widths of Stages 2, 3 and 4 of `unit` at the complexity level `alpha`."""
  if alpha not in STAGE4_CHANNELS[unit]:
    levels = ', '.join(f'{a:g} ({COMPLEXITY_MFLOPS[a]} MFLOPs)' for a in COMPLEXITY_MFLOPS)
    raise ValueError(f'model.alpha={alpha} is not a complexity level of ShuffleNet Table 4: use '
                     f'one of {levels}.')
  channels = STAGE4_CHANNELS[unit][alpha]
  return channels // 4, channels // 2, channels


class ShuffleNetStructure(layers.Backbone):
  """ShuffleNet's layout with another unit (Table 4); see the module docstring. Subclasses name
  the unit."""
  unit = ''
  padding = staticmethod(layers.symmetric_padding)

  def __post_init__(self):
    stage_widths(self.unit, self.alpha)
    if self.zero_init_residual and self.unit == 'vgg':
      raise ValueError('model.zero_init_residual applies to units with a shortcut (resnet, '
                       'resnext); the VGG-like unit has none: leave it unset.')
    super().__post_init__()

  def make_unit(self, width: int, strides: int, conv_bn, name: str) -> nn.Module:
    if self.unit == 'vgg':
      return VGGUnit(width, strides, conv_bn, name=name)
    if self.unit == 'resnet':
      bottleneck, groups = width // RESNET_BOTTLENECK_RATIO, 1
    else:
      groups = RESNEXT_CARDINALITY
      bottleneck = layers.round_to_multiple(width // RESNEXT_BOTTLENECK_RATIO, groups)
    return BottleneckUnit(width, bottleneck, groups, strides, conv_bn,
                          zero_init_residual=self.zero_init_residual, name=name)

  def features(self, x, conv_bn):
    stem = int(STEM_CHANNELS * self.alpha)
    # `small_input` drops the stride of the stem and the max pool, as ShuffleNet's.
    x = conv_bn(stem, 3, strides=1 if self.small_input else 2, name='stem')(x)
    if not self.small_input:
      # The stem's output is non-negative (ReLU): zero padding pools as -inf padding does, and
      # keeps -inf out of an int8 export's calibration (it gave the stem's output a scale of
      # 1e36, which XNNPACK refuses).
      x = layers.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), 3, 2, ((0, 0), (0, 0)),
                          self.conv_impl)
    widths = stage_widths(self.unit, self.alpha)
    for stage, (units, width) in enumerate(zip(STAGE_UNITS, widths)):
      for unit in range(units):
        x = self.make_unit(width, 2 if unit == 0 else 1, conv_bn,
                           name=f'stage{stage + 2}_unit{unit + 1}')(x)
    return x


class VGGLike(ShuffleNetStructure):
  unit = 'vgg'


class ResNetLike(ShuffleNetStructure):
  unit = 'resnet'


class ResNeXtLike(ShuffleNetStructure):
  unit = 'resnext'


STRUCTURES = {'table4_vgg': VGGLike, 'table4_resnet': ResNetLike, 'table4_resnext': ResNeXtLike}
