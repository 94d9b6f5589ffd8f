"""The three networks: shapes at every listed width and resolution, widths, blocks, errors."""

import functools
import itertools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from configs import mobilenet_v1, mobilenet_v2, shufflenet
from models import layers
from models import shufflenet as shufflenet_lib
from tests.helpers import random_variables

RESOLUTIONS = (224, 192, 160, 128, 96, 32)
V1_ALPHAS = (0.25, 0.5, 0.75, 1.0)
V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.4)
SHUFFLENET_GROUPS = (1, 2, 3, 4, 8)
SHUFFLENET_SCALES = (0.25, 0.5, 1.0, 1.5, 2.0)
NUM_CLASSES = 10


def _config(name, width, res, groups=3):
  if name == 'mobilenet_v1':
    config = mobilenet_v1.get_config(f'alpha={width},res={res}')
  elif name == 'mobilenet_v2':
    config = mobilenet_v2.get_config(f'alpha={width},res={res}')
  else:
    config = shufflenet.get_config(f'groups={groups},scale={width},res={res}')
  config.num_classes = NUM_CLASSES
  return config


ALL_WIDTHS = (
    [('mobilenet_v1', a, 1) for a in V1_ALPHAS]
    + [('mobilenet_v2', a, 1) for a in V2_ALPHAS]
    + [('shufflenet', s, g) for g, s in itertools.product(SHUFFLENET_GROUPS, SHUFFLENET_SCALES)])


def _forward(model, train):
  def run(variables, image):
    return model.apply(variables, image, train=train, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.key(1)})
  return run


@pytest.mark.parametrize('name,width,groups', ALL_WIDTHS)
def test_output_shape_every_variant(name, width, groups):
  """Every listed width traces to (batch, num_classes) logits at every listed resolution."""
  model = models.get_model(_config(name, width, 224, groups))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  for res in RESOLUTIONS:
    logits, _ = jax.eval_shape(_forward(model, train=True), variables,
                               jax.ShapeDtypeStruct((2, res, res, 3), jnp.float32))
    assert logits.shape == (2, NUM_CLASSES), res
    assert logits.dtype == jnp.float32


# Computed for real in both modes (the product above is traced): every width at 32 px (ShuffleNet:
# every g at 0.25x and every scale at g = 3) and the smaller resolutions at one width.
COMPUTED_RESOLUTIONS = (160, 96)
COMPUTED_VARIANTS = (
    [('mobilenet_v1', a, 32, 1) for a in V1_ALPHAS]
    + [('mobilenet_v1', 0.25, r, 1) for r in COMPUTED_RESOLUTIONS]
    + [('mobilenet_v2', a, 32, 1) for a in V2_ALPHAS]
    + [('mobilenet_v2', 0.35, r, 1) for r in COMPUTED_RESOLUTIONS]
    + [('shufflenet', 0.25, 32, g) for g in SHUFFLENET_GROUPS]
    + [('shufflenet', s, 32, 3) for s in SHUFFLENET_SCALES if s != 0.25]
    + [('shufflenet', 0.25, r, 8) for r in COMPUTED_RESOLUTIONS])


@pytest.mark.parametrize('name,width,res,groups', COMPUTED_VARIANTS)
def test_forward_is_finite_in_train_and_eval_mode(name, width, res, groups):
  model = models.get_model(_config(name, width, res, groups))
  variables = random_variables(model, res)
  image = jax.random.normal(jax.random.key(2), (2, res, res, 3))
  for train in (True, False):
    logits, state = jax.jit(_forward(model, train))(variables, image)
    assert logits.shape == (2, NUM_CLASSES)
    assert np.all(np.isfinite(logits)), (name, width, res, groups, train)
    if train:
      assert state['batch_stats'], 'train mode must update the BatchNorm statistics'


def _params(config):
  model = models.get_model(config)
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        image)['params']


def _kernel(params, path):
  for key in path.split('/'):
    params = params[key]
  return params['conv']['kernel'].shape


def test_make_divisible_matches_reference_rounding():
  # (value, expected) from the rule new = max(8, int(v + 4) // 8 * 8), +8 if below 0.9 v.
  for value, expected in [(11.2, 16), (5.6, 8), (8.4, 8), (33.6, 32), (44.8, 48), (89.6, 88),
                          (134.4, 136), (1792.0, 1792), (12, 16), (18, 24), (3, 8)]:
    assert layers.make_divisible(value) == expected, value


def test_mobilenet_v1_widths_follow_tf_rule():
  params = _params(_config('mobilenet_v1', 0.25, 224, 1))
  assert _kernel(params, 'stem') == (3, 3, 3, 8)  # max(int(32 * 0.25), 8)
  assert _kernel(params, 'block1_depthwise') == (3, 3, 1, 8)
  assert _kernel(params, 'block1_pointwise') == (1, 1, 8, 16)
  assert _kernel(params, 'block13_pointwise') == (1, 1, 256, 256)
  assert params['head']['classifier']['kernel'].shape == (256, NUM_CLASSES)


def test_mobilenet_v2_widths_and_last_conv_rule():
  params = _params(_config('mobilenet_v2', 0.35, 224, 1))
  assert _kernel(params, 'stem') == (3, 3, 3, 16)
  assert 'expand' not in params['block0']  # t = 1: no expansion convolution
  assert _kernel(params, 'block0/project') == (1, 1, 16, 8)
  assert _kernel(params, 'block16/project') == (1, 1, 336, 112)  # 6 * 56 -> 112
  assert _kernel(params, 'last_conv') == (1, 1, 112, 1280)  # 1280 kept for alpha <= 1
  params = _params(_config('mobilenet_v2', 1.4, 224, 1))
  assert _kernel(params, 'stem') == (3, 3, 3, 48)
  assert _kernel(params, 'last_conv') == (1, 1, 448, 1792)  # scaled for alpha > 1


def test_shufflenet_table1_widths_and_grouped_kernels():
  for groups, (c2, c3, c4) in shufflenet_lib.STAGE_CHANNELS.items():
    params = _params(_config('shufflenet', 1.0, 224, groups))
    assert _kernel(params, 'stem') == (3, 3, 3, 24)
    # First unit of Stage 2: ungrouped 1x1 on 24 channels, branch produces c2 - 24 channels.
    assert _kernel(params, 'stage2_unit1/compress') == (1, 1, 24, c2 // 4)
    assert _kernel(params, 'stage2_unit1/depthwise') == (3, 3, 1, c2 // 4)
    assert _kernel(params, 'stage2_unit1/expand') == (1, 1, c2 // 4 // groups, c2 - 24)
    # Grouped 1x1 convolutions have kernels (1, 1, cin / g, cout).
    assert _kernel(params, 'stage2_unit2/compress') == (1, 1, c2 // groups, c2 // 4)
    assert _kernel(params, 'stage3_unit1/expand') == (1, 1, c3 // 4 // groups, c3 - c2)
    assert _kernel(params, 'stage4_unit4/expand') == (1, 1, c4 // 4 // groups, c4)


@pytest.mark.parametrize('groups', [1, 3])
@pytest.mark.parametrize('scale', [0.25, 0.5, 1.0])
def test_shufflenet_scaled_widths_unchanged_for_g1_and_g3(groups, scale):
  stem, outputs, bottlenecks = shufflenet_lib.stage_widths(groups, scale)
  assert stem == int(24 * scale)
  assert outputs == tuple(int(c * scale) for c in shufflenet_lib.STAGE_CHANNELS[groups])
  assert bottlenecks == tuple(c // 4 for c in outputs)


def test_shufflenet_rounds_widths_that_do_not_divide_into_groups():
  # 0.25x, g = 4: 272 * 0.25 = 68 has bottleneck 17, not a multiple of 4; the stem 6 neither.
  assert shufflenet_lib.stage_widths(4, 0.25) == (8, (68, 136, 272), (16, 36, 68))
  # 0.5x, g = 8: the stem 12 becomes 16, as in the official implementation.
  assert shufflenet_lib.stage_widths(8, 0.5) == (16, (192, 384, 768), (48, 96, 192))
  # The stem is scaled by floor(s) above 1x.
  assert shufflenet_lib.stage_widths(3, 1.5)[0] == 24
  assert shufflenet_lib.stage_widths(3, 2.0)[0] == 48
  for groups, scale in itertools.product(SHUFFLENET_GROUPS, SHUFFLENET_SCALES):
    stem, outputs, bottlenecks = shufflenet_lib.stage_widths(groups, scale)
    assert all(c % groups == 0 for c in (stem, *outputs, *bottlenecks)), (groups, scale)


def test_channel_shuffle_is_the_papers_permutation():
  # Channels labelled (group, index): reshape to (g, n), transpose to (n, g), flatten.
  groups, per_group = 3, 4
  labels = jnp.arange(groups * per_group, dtype=jnp.float32).reshape(1, 1, 1, -1)
  shuffled = np.asarray(layers.channel_shuffle(labels, groups)).ravel()
  expected = [g * per_group + i for i in range(per_group) for g in range(groups)]
  np.testing.assert_array_equal(shuffled, expected)
  # Each run of g consecutive output channels takes one channel from every input group.
  for start in range(0, groups * per_group, groups):
    assert sorted(int(c) // per_group for c in shuffled[start:start + groups]) == list(range(groups))
  # g = 1 is the identity; an indivisible channel count is an error.
  np.testing.assert_array_equal(layers.channel_shuffle(labels, 1), labels)
  with pytest.raises(ValueError, match='do not split into 5 groups'):
    layers.channel_shuffle(labels, 5)


def _zero_last_bn(variables, path):
  """Sets scale and bias of the BatchNorm at `path` to zero, silencing a residual branch."""
  params = jax.tree.map(lambda x: x, variables['params'])
  node = params
  for key in path.split('/'):
    node = node[key]
  node['bn'] = {'scale': jnp.zeros_like(node['bn']['scale']),
                'bias': jnp.zeros_like(node['bn']['bias'])}
  return {**variables, 'params': params}


def test_inverted_residual_adds_identity_only_when_shapes_match():
  model = models.mobilenet_v2.InvertedResidual(
      features=16, expansion=6, strides=1, conv_bn=models.MobileNetV2().conv_bn(train=False))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  variables = _zero_last_bn(jax.jit(model.init)(jax.random.key(1), x), 'project')
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x).output, x)  # silenced branch: output = input
  model = model.clone(features=24)
  variables = _zero_last_bn(jax.jit(model.init)(jax.random.key(1), x), 'project')
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x).output, 0.0)  # widths differ: no residual


def test_shuffle_units_shortcuts():
  conv_bn = models.ShuffleNet().conv_bn(train=False)
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (1, 4, 4, 24)))
  unit = shufflenet_lib.ShuffleUnit(24, 6, 3, strides=1, conv_bn=conv_bn)
  variables = _zero_last_bn(jax.jit(unit.init)(jax.random.key(1), x), 'expand')
  np.testing.assert_allclose(jax.jit(unit.apply)(variables, x), x, atol=1e-6)  # ReLU(x + 0) = x for x >= 0
  unit = shufflenet_lib.ShuffleUnit(48, 12, 3, strides=2, conv_bn=conv_bn)
  variables = _zero_last_bn(jax.jit(unit.init)(jax.random.key(1), x), 'expand')
  y = np.asarray(jax.jit(unit.apply)(variables, x))
  assert y.shape == (1, 2, 2, 48)
  np.testing.assert_allclose(y[..., 24:], 0.0)  # the branch adds the 24 missing channels
  # Shortcut: 3x3 average pool, stride 2, zero padding 1 counted in the average (PyTorch default).
  np.testing.assert_allclose(y[0, 0, 0, :24], x[0, :2, :2].sum(axis=(0, 1)) / 9, rtol=1e-5)
  np.testing.assert_allclose(y[0, 1, 1, :24], x[0, 1:4, 1:4].mean(axis=(0, 1)), rtol=1e-5)


def _bn_scales(model, res):
  # Initialised op by op: compiling the whole init of a network takes far longer.
  variables = model.init(jax.random.key(0), jnp.ones((1, res, res, 3)), train=False)
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  return {path[:-len('/bn/scale')]: np.asarray(v) for path, v in flat.items()
          if path.endswith('/bn/scale')}


def test_zero_init_residual_zeroes_exactly_the_residual_branch_ends():
  # MobileNet V2: Table 2's first block of each stage (n = 1, 2, 3, 4, 3, 3, 1) has no residual.
  first_of_stage = set(itertools.accumulate((0, 1, 2, 3, 4, 3, 3)))
  v2_residual = {f'block{i}/project' for i in range(17) if i not in first_of_stage}
  # ShuffleNet: units 2.. of each stage (4, 8 and 4 units) add their branch to the input.
  sn_residual = {f'stage{s}_unit{u}/expand' for s, n in ((2, 4), (3, 8), (4, 4))
                 for u in range(2, n + 1)}
  for name, width, expected in (('mobilenet_v2', 0.35, v2_residual),
                                ('shufflenet', 0.5, sn_residual)):
    config = _config(name, width, 32)
    assert config.model.zero_init_residual is False
    assert all(np.all(s == 1) for s in _bn_scales(models.get_model(config), 32).values())
    config.model.zero_init_residual = True
    scales = _bn_scales(models.get_model(config), 32)
    assert {path for path, s in scales.items() if np.all(s == 0)} == expected, name
    assert all(np.all(s == 1) for path, s in scales.items() if path not in expected), name
  config = _config('mobilenet_v1', 0.25, 32)
  with config.unlocked():
    config.model.zero_init_residual = True
  with pytest.raises(ValueError, match='MobileNet V1 has none: leave it unset'):
    models.get_model(config)


def test_zero_init_residual_blocks_start_as_the_identity():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 24)))
  for block in (
      models.mobilenet_v2.InvertedResidual(24, 6, 1, models.MobileNetV2().conv_bn(train=False),
                                           zero_init_residual=True),
      shufflenet_lib.ShuffleUnit(24, 6, 3, strides=1, conv_bn=models.ShuffleNet().conv_bn(False),
                                 zero_init_residual=True)):
    apply = jax.jit(lambda v, x: jax.tree.leaves(block.apply(v, x))[0])  # the block's output
    variables = jax.jit(block.init)(jax.random.key(1), x)
    np.testing.assert_array_equal(apply(variables, x), x)
    trained = jax.tree.map(lambda v: v + 0.1, variables)  # once the scale moves, the branch acts
    assert not np.allclose(apply(trained, x), x)


def test_padding_conventions():
  # TF 'SAME' for MobileNets (stride 2, even input: pad 0 before, 1 after); ShuffleNet pads 1, 1.
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 1))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 1))
  def conv(padding):
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), padding,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  for model, explicit in ((models.MobileNetV1(), ((0, 1), (0, 1))),
                          (models.ShuffleNet(), ((1, 1), (1, 1)))):
    block = model.conv_bn(train=False)(1, 3, strides=2, act=None)
    variables = block.init(jax.random.key(2), x)
    variables = {**variables, 'params': {**variables['params'], 'conv': {'kernel': kernel}}}
    np.testing.assert_allclose(block.apply(variables, x), conv(explicit) / np.sqrt(1 + model.bn_epsilon),
                               rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_with_float32_parameters():
  config = _config('mobilenet_v2', 0.35, 32, 1)
  config.half_precision = True
  model = models.get_model(config)
  image = jnp.ones((2, 32, 32, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), image)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  for impl, op in (('xla', 'conv_general_dilated'), ('shifted', 'dot_general')):
    forward = functools.partial(models.get_model(config, conv_impl=impl).apply, train=False)
    jaxpr = jax.make_jaxpr(lambda v, f=forward: f(v, image))(variables)
    products = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == op]
    assert products and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in products), impl
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, image)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


def test_batchnorm_statistics_synchronise_over_axis_name():
  """With axis_name, each replica's BatchNorm uses the statistics of the whole global batch."""
  config = _config('mobilenet_v1', 0.25, 32, 1)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  model = models.get_model(config)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), images)
  def train_forward(m, x):
    return m.apply(variables, x, train=True, mutable=['batch_stats'],
                   rngs={'dropout': jax.random.key(2)})
  _, whole = jax.jit(train_forward, static_argnums=0)(model, images)
  synced = models.get_model(config, axis_name='batch')
  _, split = jax.jit(jax.vmap(lambda x: train_forward(synced, x), axis_name='batch'))(
      images.reshape(2, 2, 32, 32, 3))
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split)):
    np.testing.assert_allclose(b[0], a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b[1], a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('train', [True, False])
def test_cpu_batchnorm_equals_flax_in_float64(train):
  """layers.BatchNorm (the CPU's, with oneDNN) gives nn.BatchNorm's outputs, running averages and
  gradients (of the input, the scale and the bias) in float64, statistics synchronised over an
  axis of two replicas, as the train step's pmap does."""
  rng = np.random.default_rng(0)
  x = 1 + 3 * rng.normal(size=(2, 4, 5, 3, 6))  # (replicas, batch, height, width, channels)
  dy = rng.normal(size=x.shape)
  variables = {'params': {'scale': rng.normal(size=6), 'bias': rng.normal(size=6)},
               'batch_stats': {'mean': rng.normal(size=6), 'var': rng.uniform(0.5, 2, size=6)}}
  def results(module):
    norm = module(use_running_average=not train, momentum=0.9, epsilon=1e-3, axis_name='batch')
    def replica(params, x):
      return norm.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    (y, updates), vjp = jax.vjp(
        jax.vmap(replica, in_axes=(None, 0), axis_name='batch'), variables['params'], x)
    zero_updates = jax.tree.map(jnp.zeros_like, updates)
    return y, updates, *vjp((jnp.asarray(dy), zero_updates))
  with jax.enable_x64(True):
    ours, flax_ = results(layers.BatchNorm), results(nn.BatchNorm)
    assert ours[0].dtype == jnp.float64
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('setting,value,message', [
    ('model.alpha', 0.0, 'model.alpha must be > 0'),
    ('model.alpha', -1.0, 'model.alpha must be > 0'),
    ('model.name', 'resnet50', "Unknown model.name 'resnet50'; valid names: mobilenet_v1"),
    ('model.groups', 5, r'model.groups must be one of \[1, 2, 3, 4, 8\]'),
    ('image_size', 16, 'image_size=16 is too small for ShuffleNet.*>= 32'),
    ('model.dropout_rate', 1.0, r'model.dropout_rate must be in \[0, 1\)'),
    ('model.conv_impl', 'cudnn', 'model.conv_impl must be one of auto, xla, shifted, onednn'),
])
def test_invalid_settings_raise_clear_errors(setting, value, message):
  config = _config('shufflenet', 1.0, 224, 3)
  with config.unlocked():
    node, key = (config.model, setting[6:]) if setting.startswith('model.') else (config, setting)
    node[key] = value
  with pytest.raises(ValueError, match=message):
    models.get_model(config)


def test_unknown_model_field_and_small_input():
  config = _config('mobilenet_v1', 1.0, 224)
  config.model.groups = 3
  with pytest.raises(ValueError, match='model.groups is not a setting of mobilenet_v1'):
    models.get_model(config)
  config = _config('mobilenet_v2', 0.35, 16)
  with pytest.raises(ValueError, match='image_size=16 is too small.*model.small_input=True'):
    models.get_model(config)
  config.model.small_input = True
  model = models.get_model(config)  # total stride 8: 16 px gives a 2x2 final feature map
  image = jnp.ones((1, 16, 16, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), image)
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, image)
  assert logits.shape == (1, NUM_CLASSES)


@pytest.mark.parametrize('kernel,in_channels,features,groups,strides,padding,size', [
    (3, 3, 16, 1, 2, 'SAME', 9),               # full stem conv, odd input
    (1, 24, 40, 1, 1, 'SAME', 8),              # pointwise
    (1, 24, 36, 3, 1, 'SAME', 8),              # grouped pointwise (ShuffleNet)
    (3, 32, 32, 32, 1, 'SAME', 8),             # depthwise
    (3, 32, 32, 32, 2, 'SAME', 8),             # depthwise, stride 2 (pads 0 before, 1 after)
    (3, 32, 32, 32, 2, ((1, 1), (1, 1)), 7),   # depthwise, symmetric padding, odd input
    (3, 12, 24, 2, 2, ((1, 1), (1, 1)), 10),   # grouped 3x3
])
def test_shifted_conv_equals_xla_conv(kernel, in_channels, features, groups, strides, padding,
                                      size):
  """ShiftedConv has nn.Conv's parameter and gives its outputs and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, size, size, in_channels))
  args = dict(features=features, kernel_size=(kernel, kernel), strides=(strides, strides),
              padding=padding, feature_group_count=groups, use_bias=False)
  reference, shifted = nn.Conv(**args), layers.ShiftedConv(**args)
  variables = reference.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, shifted.init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, variables)
  def loss(module):
    return jax.jit(jax.value_and_grad(lambda v, x: (module.apply(v, x) ** 3).sum(),
                                      argnums=(0, 1)))
  (value_ref, grads_ref), (value, grads) = loss(reference)(variables, x), loss(shifted)(variables, x)
  np.testing.assert_allclose(shifted.apply(variables, x), reference.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name,width,groups', [('mobilenet_v2', 0.35, 1), ('shufflenet', 0.5, 3)])
def test_whole_network_same_with_every_conv_implementation(name, width, groups):
  config = _config(name, width, 32, groups)
  xla = models.get_model(config, conv_impl='xla')
  variables = random_variables(xla, 64)
  image = jax.random.normal(jax.random.key(3), (8, 64, 64, 3))
  for impl in ('shifted', 'onednn'):
    other = models.get_model(config, conv_impl=impl)
    # Eval mode; train mode normalises with batch statistics, which amplify float rounding in
    # channels of tiny variance, so it is compared at a looser tolerance.
    for train, tolerance in ((False, 1e-4), (True, 1e-2)):
      expected, _ = jax.jit(_forward(xla, train))(variables, image)
      actual, _ = jax.jit(_forward(other, train))(variables, image)
      np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance, err_msg=impl)
