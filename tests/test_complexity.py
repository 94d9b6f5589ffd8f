"""The MAdds/params counter against the papers' tables, reference counts and a brute-force count."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import complexity
import models
from configs import mobilenet_v1, mobilenet_v2, shufflenet
from tests.helpers import count, run_tool


def _millions(n):
  """Rounds half up to whole millions."""
  return math.floor(n / 1e6 + 0.5)


def _printed(n, printed, unit=1e6):
  """Whether the paper's `printed` figure is `n` rounded or truncated to the printed digits.

  The MobileNet papers do both: V1 prints 568.7 M as 569 but 290.7 M as 290 and 76.5 M as 76.
  """
  digits = len(str(printed).partition('.')[2])
  value = n / unit * 10**digits
  return printed * 10**digits in (math.floor(value), math.floor(value + 0.5))


# MobileNet V1 Tables 6, 7 and 9: (alpha, resolution, million MAdds, million params).
V1_TABLES = [
    (1.0, 224, 569, 4.2), (0.75, 224, 325, 2.6), (0.5, 224, 149, 1.3), (0.25, 224, 41, 0.5),
    (1.0, 192, 418, 4.2), (1.0, 160, 290, 4.2), (1.0, 128, 186, 4.2), (0.5, 160, 76, 1.32),
]


@pytest.mark.parametrize('alpha,res,macs,params', V1_TABLES)
def test_mobilenet_v1_tables(alpha, res, macs, params):
  result = count(mobilenet_v1.get_config(f'alpha={alpha},res={res}'))
  assert _printed(result.macs, macs)
  # The papers count convolution and dense kernels (1.32 M for 0.50 MobileNet-160).
  assert _printed(result.params_weights, params)


def test_mobilenet_v1_exact_counts_and_table2_shares():
  result = count(mobilenet_v1.get_config())
  assert result.params == 4_231_976  # timm mobilenetv1_100, all trainable parameters
  assert result.macs == 568_740_352
  shares = complexity.shares_by_kind(result)
  # Table 2: Conv 1x1 94.86% / 74.59%, Conv DW 3x3 3.06% / 1.06%, Fully Connected 0.18% / 24.33%.
  assert [round(x, 2) for x in shares['pointwise']] == [94.86, 74.59]
  assert [round(x, 2) for x in shares['depthwise']] == [3.06, 1.06]
  assert [round(x, 2) for x in shares['dense']] == [0.18, 24.33]
  # Table 2 prints 1.19% of MAdds for the 3x3 stem, but its 112x112x32x27 = 10.8 M MAdds are 1.91%
  # of 569 M (the printed column does not sum to 100%); the parameter share 0.02% agrees.
  assert round(shares['conv'][0], 2) == 1.91 and round(shares['conv'][1], 2) == 0.02


def test_mobilenet_v2_table4_and_exact_counts():
  result = count(mobilenet_v2.get_config())
  assert result.params == 3_504_872  # torchvision and timm mobilenetv2_100
  # Table 4: 300 M MAdds and 3.4 M parameters, truncated from 300.8 M and 3.47 M kernels.
  assert result.macs == 300_774_272
  assert _printed(result.macs, 300) and _printed(result.params_weights, 3.4)
  # alpha 1.4 matches the TF reference checkpoint table (582 M, 6.06 M), not the paper (585 M, 6.9 M).
  result = count(mobilenet_v2.get_config('alpha=1.4'))
  assert _millions(result.macs) == 582
  assert round(result.params_weights / 1e6, 2) == 6.06


@pytest.mark.parametrize('groups,macs', [(1, 143), (2, 140), (3, 137), (4, 133), (8, 137)])
def test_shufflenet_table1_excluding_fc(groups, macs):
  result = count(shufflenet.get_config(f'groups={groups}'))
  fc = sum(l.macs for l in result.layers if l.kind == 'dense')
  assert fc == result.layers[-1].weights  # one MAdd per classifier weight
  assert _millions(result.macs - fc) == macs


@pytest.mark.parametrize('scale,macs', [(2.0, 524), (1.5, 292)])
def test_shufflenet_table5(scale, macs):
  # Table 5 counts the classifier too: 2x (g = 3) 524.05 M, 1.5x (g = 3) 292.44 M.
  assert _millions(count(shufflenet.get_config(f'groups=3,scale={scale}')).macs) == macs


def test_totals_are_the_sum_of_the_rows_and_of_the_variables():
  config = shufflenet.get_config('groups=8,scale=0.5,res=160')
  model = models.get_model(config)
  result = complexity.analyze(model, 160)
  assert result.macs == sum(l.macs for l in result.layers)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 160, 160, 3)),
                                                train=False))
  assert result.params == sum(x.size for x in jax.tree.leaves(variables['params']))
  kinds = {l.kind for l in result.layers}
  assert kinds == {'conv', 'pointwise', 'grouped pointwise', 'depthwise', 'dense'}


class TinyNet(nn.Module):
  """Every kind of layer the counter distinguishes, with unpadded 3x3 convolutions."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.Conv(8, (3, 3), (2, 2), padding='VALID', name='full')(x)
    x = nn.Conv(8, (3, 3), padding='VALID', feature_group_count=8, use_bias=False,
                name='depthwise')(x)
    x = nn.Conv(12, (1, 1), feature_group_count=4, name='grouped')(x)
    x = nn.Conv(6, (1, 1), name='pointwise')(x)
    x = nn.Conv(6, (3, 3), padding='VALID', feature_group_count=2, name='grouped3x3')(x)
    return nn.Dense(5, name='dense')(x.reshape(x.shape[0], -1))


def test_counter_agrees_with_brute_force_on_a_tiny_model():
  """Brute force: a layer's MAdds are the (output, kernel weight) pairs that a product links,
  i.e. the non-zero entries of d(output)/d(kernel), evaluated with random non-zero inputs."""
  model = TinyNet()
  image = jax.random.normal(jax.random.key(0), (1, 13, 13, 3))
  variables = model.init(jax.random.key(1), image)
  _, state = model.apply(variables, image, capture_intermediates=True, mutable=['intermediates'])
  brute = {}
  for name in ('full', 'depthwise', 'grouped', 'pointwise', 'grouped3x3', 'dense'):
    def layer_output(kernel, name=name):
      params = {**variables['params'], name: {**variables['params'][name], 'kernel': kernel}}
      _, st = model.apply({'params': params}, image, capture_intermediates=True,
                          mutable=['intermediates'])
      return st['intermediates'][name]['__call__'][0]
    jacobian = jax.jit(jax.jacfwd(layer_output))(variables['params'][name]['kernel'])
    brute[name] = int(np.count_nonzero(np.asarray(jacobian)))
  result = complexity.analyze(model, 13)
  counted = {l.name: l.macs for l in result.layers}
  assert counted == brute
  assert {l.name: l.kind for l in result.layers} == {
      'full': 'conv', 'depthwise': 'depthwise', 'grouped': 'grouped pointwise',
      'pointwise': 'pointwise', 'grouped3x3': 'grouped conv', 'dense': 'dense'}
  assert result.params == sum(x.size for x in jax.tree.leaves(variables['params']))
  assert result.params_weights == sum(
      v['kernel'].size for v in variables['params'].values())


@pytest.mark.slow
def test_command_line_json_and_table():
  command = ['complexity.py', '--config=configs/mobilenet_v2.py', '--config.model.alpha=0.5',
             '--config.image_size=160']
  out = run_tool(*command, '--json', check=True)
  summary = json.loads(out.stdout)
  expected = count(mobilenet_v2.get_config('alpha=0.5,res=160'))
  assert summary['macs'] == expected.macs and summary['params'] == expected.params
  assert summary['params_weights'] == expected.params_weights
  assert (summary['model'], summary['alpha'], summary['image_size'], summary['num_classes']) == (
      'mobilenet_v2', 0.5, 160, 1000)
  assert summary['ablations'] == {}
  variant = run_tool(*command, '--json', '--config.model.shortcut=none', check=True)
  assert json.loads(variant.stdout)['ablations'] == {'shortcut': 'none'}
  table = run_tool(*command, check=True).stdout
  assert 'block1/depthwise/conv' in table and 'depthwise' in table and 'MAdds:' in table
  bad = run_tool('complexity.py', '--config=configs/shufflenet.py:groups=5')
  assert bad.returncode != 0 and 'model.groups must be one of' in bad.stderr
