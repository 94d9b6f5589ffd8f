r"""Multiply-adds (MAdds) and parameters of any model variant, counted from its forward pass.

The forward pass of one image is traced to a jaxpr (nothing is compiled or run) and every
convolution and matrix product in it is counted: a convolution costs
Hout * Wout * Cout * k * k * Cin / groups MAdds, a dense layer Cin * Cout. BatchNorm, activations,
pooling, residual adds and biases are not counted, as in the papers. Parameters are counted from the
model's variables: `params` is everything trainable (kernels, biases, BatchNorm scale and bias),
`params_weights` only the convolution and dense kernels.

    python complexity.py --config=configs/mobilenet_v2.py --config.model.alpha=0.5 \
        --config.image_size=160 [--json]
"""

import collections
import dataclasses
import functools
import json
import math
import sys

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags

import cli
from configs import default
import models

KINDS = ('conv', 'grouped conv', 'depthwise', 'pointwise', 'grouped pointwise', 'dense')


@dataclasses.dataclass(frozen=True)
class Layer:
  name: str
  kind: str
  output_shape: tuple[int, ...]
  macs: int
  params: int  # the layer's own parameters: kernel and bias
  weights: int  # its kernel alone


@dataclasses.dataclass(frozen=True)
class Complexity:
  layers: tuple[Layer, ...]
  macs: int
  params: int
  params_weights: int


def _conv_layer(eqn) -> tuple[str, int]:
  """Kind and MAdds of one `conv_general_dilated` for a batch of one."""
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  out = eqn.outvars[0].aval.shape
  dims = eqn.params['dimension_numbers']
  groups = eqn.params['feature_group_count']
  in_channels = lhs[dims.lhs_spec[1]]
  in_per_group = rhs[dims.rhs_spec[1]]
  window = math.prod(rhs[d] for d in dims.rhs_spec[2:])
  macs = math.prod(out) // out[dims.out_spec[0]] * in_per_group * window
  if groups > 1 and groups == in_channels and in_per_group == 1:
    kind = 'depthwise'
  elif window == 1:
    kind = 'pointwise' if groups == 1 else 'grouped pointwise'
  else:
    kind = 'conv' if groups == 1 else 'grouped conv'
  return kind, macs


def _dot_layer(eqn) -> tuple[str, int]:
  """Kind and MAdds of one `dot_general` for a batch of one."""
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  return 'dense', math.prod(out) // out[0] * math.prod(lhs[d] for d in lhs_contract)


def _equations(jaxpr, scope=''):
  """Yields (scope, equation) for every equation, descending into nested jaxprs."""
  for eqn in jaxpr.eqns:
    name = '/'.join(filter(None, (scope, str(eqn.source_info.name_stack))))
    yield name, eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          yield from _equations(sub, name)


def _module_path(scope: str) -> str:
  """'Model/Model.features/block1/conv' -> 'block1/conv', the path of the module's parameters.

  Flax names each module call in the jaxpr's scope: `name` for `__call__`, `name.method` for other
  methods; the root module is named by its class and a method's owner is not repeated.
  """
  parts = []
  for part in scope.split('/'):
    owner, _, method = part.partition('.')
    if not (method and parts and parts[-1] == owner):
      parts.append(owner)
  return '/'.join(parts[1:])


def _subtree(tree, path: str):
  for key in path.split('/'):
    if not isinstance(tree, dict) or key not in tree:
      return {}
    tree = tree[key]
  return tree


def _size(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def analyze(model, image_size: int) -> Complexity:
  """Counts the MAdds and parameters of `model` on one image of image_size x image_size x 3."""
  if hasattr(model, 'conv_impl'):
    model = model.clone(conv_impl='xla')  # count the convolutions as convolution operations
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
  params = dict(variables['params'])
  with nn.override_named_call(True):
    forward = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, image)
  layers = []
  for scope, eqn in _equations(forward.jaxpr):
    if eqn.primitive.name == 'conv_general_dilated':
      kind, macs = _conv_layer(eqn)
    elif eqn.primitive.name == 'dot_general':
      kind, macs = _dot_layer(eqn)
    else:
      continue
    path = _module_path(scope)
    layers.append(Layer(path, kind, tuple(eqn.outvars[0].aval.shape[1:]), macs,
                        _size(_subtree(params, path)), math.prod(eqn.invars[1].aval.shape)))
  return Complexity(tuple(layers), sum(l.macs for l in layers), _size(params),
                    sum(l.weights for l in layers))


def summary(config) -> dict:
  """The JSON summary of `config`'s model: macs, params, params_weights and what identifies it
  (`ablations`: the settings in which it differs from the paper's main network)."""
  model = models.get_model(config)
  result = analyze(model, config.image_size)
  return {
      'model': config.model.name,
      'alpha': config.model.alpha,
      'groups': config.model.get('groups'),
      'image_size': config.image_size,
      'num_classes': config.num_classes,
      'small_input': config.model.get('small_input', False),
      'ablations': default.changed_ablations(config.model),
      'macs': result.macs,
      'params': result.params,
      'params_weights': result.params_weights,
  }


def shares_by_kind(result: Complexity) -> dict[str, tuple[float, float]]:
  """{kind: (% of MAdds, % of kernel parameters)}, as in MobileNet V1 Table 2."""
  macs, weights = collections.Counter(), collections.Counter()
  for l in result.layers:
    macs[l.kind] += l.macs
    weights[l.kind] += l.weights
  return {kind: (100 * macs[kind] / result.macs, 100 * weights[kind] / result.params_weights)
          for kind in KINDS if kind in macs}


def format_table(result: Complexity) -> str:
  """The per-layer table, the totals and the shares by layer kind."""
  name_width = max(len(l.name) for l in result.layers)
  lines = [f'{"layer":<{name_width}}  {"kind":<17}  {"output":>14}  {"MAdds":>12}  {"params":>10}']
  for l in result.layers:
    shape = 'x'.join(map(str, l.output_shape))
    lines.append(f'{l.name:<{name_width}}  {l.kind:<17}  {shape:>14}  {l.macs:>12,}  {l.params:>10,}')
  layer_params = sum(l.params for l in result.layers)
  lines += [
      '',
      f'MAdds: {result.macs:,} ({result.macs / 1e6:.1f} M)',
      f'params: {result.params:,} ({result.params / 1e6:.2f} M): conv and dense kernels '
      f'{result.params_weights:,}, biases {layer_params - result.params_weights:,}, '
      f'BatchNorm {result.params - layer_params:,}',
      '',
      f'{"kind":<17}  {"MAdds":>8}  {"kernels":>8}',
  ]
  for kind, (macs, weights) in shares_by_kind(result).items():
    lines.append(f'{kind:<17}  {macs:7.2f}%  {weights:7.2f}%')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  if flags.FLAGS.json:
    print(json.dumps(summary(config)))
  else:
    model = models.get_model(config)
    print(format_table(analyze(model, config.image_size)))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Model config file.', lock_config=True)
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')
  flags.mark_flag_as_required('config')
  try:
    app.run(main, flags_parser=cli.parse_flags)
  except ValueError as e:
    sys.exit(f'error: {e}')
