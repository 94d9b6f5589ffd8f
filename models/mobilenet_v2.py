"""MobileNet V2 (Sandler et al. 2018, Tables 1 and 2).

A 3x3 stride-2 convolution, 17 inverted-residual blocks, a 1x1 convolution to 1280 channels, global
average pooling and the classifier. Widths follow the reference implementations: `make_divisible`
(multiples of 8) on the stem, on every block output and on the expansion width; the last 1x1
convolution stays 1280 wide for alpha <= 1 and is scaled only for alpha > 1.

The ablations of section 6.1 and Figure 6 are settings of the same network:
- `bottleneck_activation='relu6'` puts a ReLU6 after the projection (Figure 6a, "Relu6 in
  bottleneck"), against the linear bottleneck of the paper.
- `shortcut='expansion'` connects the wide expansion layers instead of the narrow bottlenecks
  (Figure 6b, "Shortcut between expansions", the classic residual block of Figure 3a);
  `shortcut='none'` removes the residual connections ("No residual").
None of them changes the MAdds or parameters.
"""

from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

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
BOTTLENECK_ACTIVATIONS = {'linear': None, 'relu6': nn.relu6}
SHORTCUTS = ('bottleneck', 'expansion', 'none')


class BlockOutput(NamedTuple):
  """An inverted residual block's output and the tensor that the next block's expansion adds
  (`shortcut='expansion'`, after a block whose input and output shapes match; else None)."""
  output: jnp.ndarray
  next_shortcut: Optional[jnp.ndarray]


class InvertedResidual(nn.Module):
  """Table 1: 1x1 expansion -> 3x3 depthwise -> 1x1 projection (linear, or followed by
  `projection_act`). No expansion when t = 1.

  Where the stride is 1 and the input and output widths match, `shortcut='bottleneck'` adds the
  input to the projection's output (Figure 3b); `shortcut='expansion'` instead hands this block's
  expansion output on, and the next block adds it to its own expansion before the ReLU6
  (Figure 3a: wide -> narrow -> wide residual blocks); 'none' adds nothing.
  """
  features: int
  expansion: int
  strides: int
  conv_bn: layers.ModuleDef
  zero_init_residual: bool = False
  projection_act: Optional[Callable[[jnp.ndarray], jnp.ndarray]] = None
  shortcut: str = 'bottleneck'

  @nn.compact
  def __call__(self, x, expansion_shortcut: Optional[jnp.ndarray] = None) -> BlockOutput:
    in_channels = x.shape[-1]
    hidden = layers.make_divisible(in_channels * self.expansion)
    matching = self.strides == 1 and in_channels == self.features
    residual = matching and self.shortcut == 'bottleneck'
    y = x
    if self.expansion != 1:
      y = self.conv_bn(hidden, 1, act=None if expansion_shortcut is not None else nn.relu6,
                       name='expand')(y)
      if expansion_shortcut is not None:
        y = nn.relu6(y + expansion_shortcut)
    elif expansion_shortcut is not None:
      raise ValueError('An expansion shortcut needs a block with an expansion layer (t > 1).')
    expanded = y
    y = self.conv_bn(kernel_size=3, strides=self.strides, act=nn.relu6, name='depthwise',
                     **layers.depthwise(hidden))(y)
    y = self.conv_bn(self.features, 1, act=self.projection_act,
                     zero_scale=self.zero_init_residual and residual, name='project')(y)
    passes_on = matching and self.shortcut == 'expansion' and self.expansion != 1
    return BlockOutput(y + x if residual else y, expanded if passes_on else None)


class MobileNetV2(layers.Backbone):
  """MobileNet V2; see the module docstring."""
  bottleneck_activation: str = 'linear'
  shortcut: str = 'bottleneck'

  def __post_init__(self):
    if self.bottleneck_activation not in BOTTLENECK_ACTIVATIONS:
      raise ValueError(f'model.bottleneck_activation must be one of '
                       f'{", ".join(map(repr, BOTTLENECK_ACTIVATIONS))}, got '
                       f'{self.bottleneck_activation!r}.')
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f'model.shortcut must be one of {", ".join(map(repr, SHORTCUTS))}, got '
                       f'{self.shortcut!r}.')
    if self.zero_init_residual and self.shortcut != 'bottleneck':
      raise ValueError(f"model.zero_init_residual zeroes the branch ends of the bottleneck "
                       f"shortcuts; with model.shortcut={self.shortcut!r} leave it unset.")
    super().__post_init__()

  def features(self, x, conv_bn):
    # `small_input` keeps the full resolution through the stem and the first stride-2 stage.
    first_stride = 1 if self.small_input else 2
    x = conv_bn(layers.make_divisible(STEM_CHANNELS * self.alpha), 3, strides=first_stride,
                act=nn.relu6, name='stem')(x)
    index = 0
    shortcut = None
    for stage, (expansion, channels, repeats, stride) in enumerate(BLOCKS):
      if self.small_input and stage == 1:
        stride = 1
      for repeat in range(repeats):
        x, shortcut = InvertedResidual(
            layers.make_divisible(channels * self.alpha), expansion, stride if repeat == 0 else 1,
            conv_bn, self.zero_init_residual, BOTTLENECK_ACTIVATIONS[self.bottleneck_activation],
            self.shortcut, name=f'block{index}')(x, shortcut)
        index += 1
    last = LAST_CHANNELS if self.alpha <= 1.0 else layers.make_divisible(LAST_CHANNELS * self.alpha)
    return conv_bn(last, 1, act=nn.relu6, name='last_conv')(x)
