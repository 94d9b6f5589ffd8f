"""The papers' ablation variants: what each setting builds, its errors, and its published
complexity (MobileNet V1 Tables 4, 5 and 10, MobileNet V2 Figure 6, ShuffleNet Tables 3 and 5)."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, mobilenet_v1, mobilenet_v2, shufflenet
import models
from models import layers
from models import mobilenet_v2 as mobilenet_v2_lib
from models import shufflenet as shufflenet_lib
from tests.helpers import count, tiny_config


def _param_shapes(config):
  model = models.get_model(config)
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
  return {k: v.shape for k, v in flax.traverse_util.flatten_dict(
      variables['params'], sep='/').items()}


def _round(n, digits=0):
  return round(n / 1e6, digits)


# --- MobileNet V1 ---------------------------------------------------------------------------

def test_conv_mobilenet_table4():
  config = mobilenet_v1.get_config()
  config.model.separable = False
  shapes = _param_shapes(config)
  assert not any('depthwise' in k or 'pointwise' in k for k in shapes)
  # Every separable block is one full 3x3 convolution with the block's output width.
  assert shapes['block1_conv/conv/kernel'] == (3, 3, 32, 64)
  assert shapes['block13_conv/conv/kernel'] == (3, 3, 1024, 1024)
  result = count(config)
  # Table 4: 29.3 M parameters. Its 4866 M Mult-Adds are this count without the classifier's
  # 1.024 M (4866.27 M); with it, as the paper counts the 569 M of MobileNet, 4867.29 M.
  assert _round(result.params, 1) == 29.3 and _round(result.params_weights, 1) == 29.3
  assert result.macs == 4_867_293_184
  assert _round(result.macs - 1024 * 1000) == 4866


def test_shallow_mobilenet_table5():
  config = mobilenet_v1.get_config()
  config.model.shallow = True
  names = {k.split('/')[0] for k in _param_shapes(config)}
  assert not any(f'block{i}_' in ' '.join(names) for i in range(7, 12))
  assert {'block6_pointwise', 'block12_depthwise'} <= names
  result = count(config)
  assert _round(result.macs) == 307  # Table 5: 307 M, 2.9 M against 0.75 MobileNet's 325 M, 2.6 M
  assert _round(result.params_weights, 1) == 2.9 and _round(result.params, 1) == 2.9


@pytest.mark.parametrize('alpha,res,macs,params', [
    (1.0, 224, 569, 3.3), (0.75, 224, 325, 1.9), (1.0, 192, 418, 3.3), (0.75, 192, 239, 1.9)])
def test_stanford_dogs_table10(alpha, res, macs, params):
  """Table 10 gives the parameters of the 120-class networks (3.3 M = 4.2 M - 1000 x 1024 +
  120 x 1024) but the Mult-Adds of the 1000-class ones (569 M, not the 567.8 M of 120 classes)."""
  config = mobilenet_v1.get_config(f'alpha={alpha},res={res}')
  assert _round(count(config).macs) == macs
  config.num_classes = 120
  assert _round(count(config).params_weights, 1) == params


# --- MobileNet V2 ---------------------------------------------------------------------------

def _block(**kwargs):
  conv_bn = models.MobileNetV2().conv_bn(train=False)
  return mobilenet_v2_lib.InvertedResidual(16, 6, 1, conv_bn, **kwargs)


def _zero_bn(variables, layer):
  params = flax.core.unfreeze(variables['params'])
  params[layer]['bn'] = jax.tree.map(jnp.zeros_like, params[layer]['bn'])
  return {**variables, 'params': params}


def test_relu6_in_the_bottleneck():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  outputs = {}
  for name in ('linear', 'relu6'):
    block = _block(projection_act=mobilenet_v2_lib.BOTTLENECK_ACTIVATIONS[name], shortcut='none')
    variables = jax.jit(block.init)(jax.random.key(1), x)
    outputs[name] = np.asarray(jax.jit(block.apply)(variables, x).output)
  assert outputs['linear'].min() < 0
  np.testing.assert_allclose(outputs['relu6'], np.clip(outputs['linear'], 0, 6), atol=1e-6)


def test_shortcut_between_bottlenecks_expansions_or_none():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  other = jax.random.normal(jax.random.key(2), (2, 8, 8, 16))
  # Silencing the projection leaves the input for 'bottleneck' and nothing for 'none'.
  for shortcut, expected in (('bottleneck', x), ('none', 0 * x)):
    block = _block(shortcut=shortcut)
    variables = _zero_bn(jax.jit(block.init)(jax.random.key(1), x), 'project')
    result = jax.jit(block.apply)(variables, x)
    np.testing.assert_allclose(result.output, expected)
    assert result.next_shortcut is None
  # 'expansion': a block whose shapes match hands on its expansion (ReLU6 output, 96 wide) ...
  block = _block(shortcut='expansion')
  variables = jax.jit(block.init)(jax.random.key(1), x)
  first = jax.jit(block.apply)(variables, x)
  assert first.next_shortcut.shape == (2, 8, 8, 96)
  assert 0 <= first.next_shortcut.min() and first.next_shortcut.max() <= 6
  wider = block.clone(features=24)  # shapes differ: nothing to hand on
  assert jax.jit(wider.apply)(jax.jit(wider.init)(jax.random.key(1), x), x).next_shortcut is None
  # ... and the next block adds it to its own expansion before the ReLU6: with that expansion
  # silenced, the next block's output depends on the shortcut alone, not on its input.
  silenced = _zero_bn(variables, 'expand')
  second = jax.jit(block.apply)
  np.testing.assert_allclose(second(silenced, x, first.next_shortcut).output,
                             second(silenced, other, first.next_shortcut).output, atol=1e-6)
  assert not np.allclose(second(variables, x, first.next_shortcut).output,
                         second(variables, other, first.next_shortcut).output, atol=1e-3)
  assert not np.allclose(second(silenced, x, first.next_shortcut).output,
                         second(silenced, x).output, atol=1e-3)


def test_expansion_shortcuts_replace_exactly_the_bottleneck_shortcuts():
  config = mobilenet_v2.get_config('alpha=0.35,res=32')
  config.model.shortcut = 'expansion'
  model = models.get_model(config)
  image = jnp.ones((1, 32, 32, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), image)
  _, state = jax.jit(functools.partial(model.apply, train=False, capture_intermediates=True,
                                       mutable=['intermediates']))(variables, image)
  handed_on = {name for name, block in state['intermediates'].items()
               if name.startswith('block') and block['__call__'][0].next_shortcut is not None}
  # Table 2: the blocks after the first of each stage (n = 1, 2, 3, 4, 3, 3, 1) have the
  # bottleneck shortcut; those same 10 blocks hand their expansion to the next block.
  first_of_stage = {0, 1, 3, 6, 10, 13, 16}
  assert handed_on == {f'block{i}' for i in range(17) if i not in first_of_stage}
  for shortcut in ('bottleneck', 'none'):
    config.model.shortcut = shortcut
    assert _param_shapes(config) == _param_shapes(mobilenet_v2.get_config('alpha=0.35,res=32'))


def test_mobilenet_v2_ablations_keep_table4_complexity():
  for field, value in (('bottleneck_activation', 'relu6'), ('shortcut', 'expansion'),
                       ('shortcut', 'none')):
    config = mobilenet_v2.get_config()
    config.model[field] = value
    result = count(config)
    assert (result.macs, result.params) == (300_774_272, 3_504_872)


# --- ShuffleNet -----------------------------------------------------------------------------

@pytest.mark.parametrize('shuffle', [True, False])
def test_without_the_shuffle_groups_stay_apart(shuffle):
  """Figure 1: without the shuffle, stacked group convolutions keep each group's channels to
  itself; with it, every output group depends on every input group."""
  conv_bn = models.ShuffleNet().conv_bn(train=False)
  unit = shufflenet_lib.ShuffleUnit(24, 9, 3, strides=1, conv_bn=conv_bn, shuffle=shuffle)
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 24))
  variables = jax.jit(unit.init)(jax.random.key(1), x)
  jacobian = jax.jacobian(lambda x: jnp.sum(unit.apply(variables, x), axis=(0, 1, 2)))(x)
  dependence = np.abs(np.asarray(jacobian)).sum(axis=(1, 2, 3)).reshape(3, 8, 3, 8).sum(
      axis=(1, 3))  # (output group, input group)
  off_diagonal = dependence[~np.eye(3, dtype=bool)]
  if shuffle:
    assert off_diagonal.min() > 0
  else:
    np.testing.assert_array_equal(off_diagonal, 0)


def test_no_shuffle_keeps_table3_complexity():
  for groups, scale in ((3, 1.0), (8, 0.5), (8, 0.25)):
    config = shufflenet.get_config(f'groups={groups},scale={scale}')
    expected = count(config)
    config.model.channel_shuffle = False
    assert (count(config).macs, count(config).params) == (expected.macs, expected.params)


def test_shallow_shufflenet_table5():
  config = shufflenet.get_config('groups=3,scale=0.71')
  config.model.shallow = True
  units = {k.split('/')[0] for k in _param_shapes(config) if k.startswith('stage')}
  # "removing half of the blocks in Stage 2-4": 2, 4 and 2 units, 26 weighted layers.
  assert units == {f'stage{s}_unit{u}' for s, n in ((2, 2), (3, 4), (4, 2))
                   for u in range(1, n + 1)}
  assert 1 + 3 * len(units) + 1 == 26
  assert _round(count(config).macs) == 40
  config.model.alpha = 0.5  # the 50-layer network's width gives half the published complexity
  assert _round(count(config).macs, 1) == 21.6


def test_shufflenet_with_se_table5():
  config = shufflenet.get_config('groups=3,scale=2.0')
  plain = count(config)
  config.model.se_reduction = 16
  shapes = _param_shapes(config)
  # Reduction 16 over the unit's output width, in every unit (stride 2 included).
  assert shapes['stage2_unit1/se/reduce/kernel'] == (480, 30)
  assert shapes['stage3_unit8/se/restore/kernel'] == (60, 960)
  assert shapes['stage4_unit4/se/reduce/kernel'] == (1920, 120)
  assert sum(k.endswith('se/reduce/kernel') for k in shapes) == 16
  result = count(config)
  assert _round(plain.macs) == 524 and _round(result.macs) == 527  # Table 5
  assert [l.kind for l in result.layers].count('dense') == 2 * 16 + 1


def test_squeeze_excitation_weighs_each_channel():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 32))
  se = layers.SqueezeExcitation(reduction=16)
  variables = se.init(jax.random.key(1), x)
  p = variables['params']
  pooled = np.asarray(x).mean(axis=(1, 2))
  hidden = np.maximum(pooled @ p['reduce']['kernel'] + p['reduce']['bias'], 0)
  weights = 1 / (1 + np.exp(-(hidden @ p['restore']['kernel'] + p['restore']['bias'])))
  assert p['reduce']['kernel'].shape == (32, 2)
  np.testing.assert_allclose(se.apply(variables, x), np.asarray(x) * weights[:, None, None],
                             rtol=1e-5, atol=1e-6)


# --- Settings -------------------------------------------------------------------------------

def test_config_defaults_build_the_papers_networks():
  for name, ablations in default.ABLATIONS.items():
    fields = {f.name: f.default for f in models.MODELS[name].__dataclass_fields__.values()}
    assert {k: fields[k] for k in ablations} == ablations, name


@pytest.mark.parametrize('config_file,field,value,message', [
    (mobilenet_v2, 'bottleneck_activation', 'relu', "bottleneck_activation must be one of 'linear'"),
    (mobilenet_v2, 'shortcut', 'wide', "model.shortcut must be one of 'bottleneck', 'expansion'"),
    (shufflenet, 'se_reduction', -1, 'model.se_reduction must be 0'),
    (mobilenet_v2, 'shallow', True, 'model.shallow is not a setting of mobilenet_v2'),
    (mobilenet_v1, 'channel_shuffle', False, 'model.channel_shuffle is not a setting of mobilenet_v1'),
    (shufflenet, 'separable', False, 'model.separable is not a setting of shufflenet'),
])
def test_bad_ablation_settings_are_one_clear_error(config_file, field, value, message):
  config = config_file.get_config()
  config.model[field] = value
  with pytest.raises(ValueError, match=message):
    models.get_model(config)


def test_zero_init_residual_needs_the_bottleneck_shortcut():
  config = mobilenet_v2.get_config()
  config.model.zero_init_residual = True
  config.model.shortcut = 'none'
  with pytest.raises(ValueError, match="model.shortcut='none' leave it unset"):
    models.get_model(config)


# --- Stanford Dogs (Table 10) ---------------------------------------------------------------

def test_stanford_dogs_fine_tunes_an_imagenet_checkpoint_on_mock_data(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top
  from configs import stanford_dogs  # pylint: disable=g-import-not-at-top
  import workdirs  # pylint: disable=g-import-not-at-top

  source = str(tmp_path / 'imagenet')
  train.train_and_evaluate(tiny_config(num_train_steps=1, ema_decay=0.0), source)
  config = stanford_dogs.get_config(f'alpha=0.25,res=32,init_from={source}')
  assert (config.num_classes, config.eval_split, config.init_from) == (120, 'test', source)
  for field, value in {'batch_size': 8, 'eval_batch_size': 8, 'num_train_steps': 2,
                       'shuffle_buffer': 16, 'log_every_steps': 1}.items():
    config[field] = value
  tuned = str(tmp_path / 'dogs')
  with tfds.testing.mock_data(num_examples=12):
    results = train.train_and_evaluate(config, tuned)
  assert results['eval_count'] == 12  # every mock test example evaluated once
  start = flax.traverse_util.flatten_dict(workdirs.restore_variables(source)[0]['params'])
  end, step = workdirs.restore_variables(tuned)
  end = flax.traverse_util.flatten_dict(end['params'])
  assert step == 2 and end[('head', 'classifier', 'kernel')].shape == (256, 120)
  assert end.keys() == start.keys()
  # Training moved the backbone from the ImageNet weights it started from.
  assert not np.allclose(end[('block13_pointwise', 'conv', 'kernel')],
                         start[('block13_pointwise', 'conv', 'kernel')])
