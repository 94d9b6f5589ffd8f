"""The seed deck's other networks: SqueezeNet and Xception against their peers with the same
weights, the counts of the official files, and ShuffleNet Table 4's structures and widths."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorchcv.models import squeezenet as pytorchcv_squeezenet

import complexity
import convert
import models
import train
import weight_formats
import workdirs
from configs import default
from configs import shufflenet, shufflenet_table4, squeezenet, xception
from models import shufflenet_structures
from tests.helpers import TINY, random_variables


def logits_of(config, variables, images):
  model = models.get_model(config)
  return np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, images))


def assert_same_logits(ours, theirs):
  scale = np.abs(theirs).max()
  assert scale > 0.1 and np.abs(theirs).min() < 0.5 * scale  # spread-out logits
  assert np.abs(ours - theirs).max() <= 1e-4 * scale, np.abs(ours - theirs).max() / scale


@pytest.mark.parametrize('version,bypass,params', [
    ('1.0', 'none', 1_248_424), ('1.1', 'none', 1_235_496), ('1.0', 'simple', 1_248_424),
    ('1.0', 'complex', 1_248_424 + 341_248), ('1.1', 'complex', 1_235_496 + 337_152)])
def test_squeezenet_parameters_of_the_official_files(version, bypass, params):
  config = squeezenet.get_config(f'version={version},bypass={bypass}')
  assert complexity.analyze(models.get_model(config), 227).params == params


def test_xception_parameters_of_table_3():
  """22,855,952 trainable parameters (Table 3) and Keras's 54,528 BatchNorm statistics."""
  config = xception.get_config()
  model = models.get_model(config)
  assert complexity.analyze(model, 299).params == 22_855_952
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes['batch_stats'])) == 54_528


@pytest.mark.parametrize('peer_name,version,bypass', [
    ('squeezenet_v1_0', '1.0', 'none'), ('squeezenet_v1_1', '1.1', 'none'),
    ('squeezeresnet_v1_0', '1.0', 'simple')])
def test_pytorchcv_squeezenet_weights_give_pytorchcv_logits(peer_name, version, bypass, tmp_path):
  """pytorchcv's SqueezeNets with random weights and biases, converted, give pytorchcv's logits at
  224 px, where the max pools' rounding up matters (109 -> 54 -> 27 -> 13 in v1.0); the class
  count comes from the weights."""
  torch.manual_seed(0)
  peer = getattr(pytorchcv_squeezenet, peer_name)(num_classes=10).eval()
  with torch.no_grad():
    for name, tensor in peer.named_parameters():
      if name.endswith('bias'):
        tensor.normal_(0.1, 0.1)
  torch.save(peer.state_dict(), tmp_path / 'peer.pth')
  config = squeezenet.get_config(f'version={version},bypass={bypass},res=224')
  convert.import_weights('pytorchcv', str(tmp_path / 'peer.pth'), config, str(tmp_path / 'ours'))
  converted, variables = workdirs.load_for_inference(str(tmp_path / 'ours'), False)
  assert converted.num_classes == 10
  images = np.random.default_rng(1).normal(0, 1, (2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    expected = peer(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  assert_same_logits(logits_of(converted, variables, images), expected)


@pytest.mark.parametrize('res', [71, 100])
def test_xception_keras_weights_give_keras_logits(res, tmp_path):
  """Keras applications' Xception with our random weights and BatchNorm statistics (written by
  the export direction of the keras format) gives our logits; its .weights.h5 file converts back
  to exactly our variables (71 px is its smallest input; at 100 px the 'SAME' pools of 24 px pad
  unevenly)."""
  config = xception.get_config(f'res={res}')
  config.num_classes = 10
  variables = random_variables(models.get_model(config), res, random_batchnorm=True)
  peer = weight_formats.keras_application(config)
  shapes = {name: value.shape for name, value in weight_formats.keras_weights(peer).items()}
  weight_formats.set_keras_weights(
      peer, weight_formats.published_variables('keras', 'xception', variables, shapes))
  peer.save_weights(str(tmp_path / 'peer.weights.h5'))
  convert.import_weights('keras', str(tmp_path / 'peer.weights.h5'), config,
                         str(tmp_path / 'ours'))
  converted, restored = workdirs.load_for_inference(str(tmp_path / 'ours'), False)
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  images = np.random.default_rng(2).normal(0, 1, (2, res, res, 3)).astype(np.float32)
  expected = np.asarray(peer(images, training=False))
  assert_same_logits(logits_of(converted, restored, images), expected)


STRUCTURES = [(unit, scale) for unit in ('vgg', 'resnet', 'resnext') for scale in (1.0, 0.5, 0.25)]


def structure_macs(unit, scale, stage4_channels=None):
  config = shufflenet_table4.get_config(f'unit={unit},scale={scale}')
  widths = shufflenet_structures.STAGE4_CHANNELS[unit]
  original = widths[scale]
  widths[scale] = stage4_channels or original
  try:
    return complexity.analyze(models.get_model(config), 224).macs / 1e6
  finally:
    widths[scale] = original


@pytest.mark.parametrize('unit,scale', STRUCTURES)
def test_table4_widths_are_nearest_the_level_in_ratio(unit, scale):
  """Each structure's Stage 4 width is the one of its grid whose MFLOPs are nearest in ratio to
  the level's 140, 38 or 13 (models/shufflenet_structures.py)."""
  target = shufflenet_structures.COMPLEXITY_MFLOPS[scale]
  channels = shufflenet_structures.STAGE4_CHANNELS[unit][scale]
  step = shufflenet_structures.WIDTH_GRID[unit]
  miss = {c: abs(math.log(structure_macs(unit, scale, c) / target))
          for c in (channels - step, channels, channels + step)}
  assert min(miss, key=miss.get) == channels, miss


def test_table4_stage4_widths_at_38_mflops():
  """Section 4.2: at 38 MFLOPs, Stage 4 has 50 (VGG-like), 192 (ResNet), 192 (ResNeXt) and 288
  (Xception-like, ShuffleNet g = 1 at 0.5x) channels."""
  def stage4_width(config):
    shapes = jax.eval_shape(functools.partial(models.get_model(config).init, train=False),
                            jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    return shapes['params']['head']['classifier']['kernel'].shape[0]
  widths = [stage4_width(shufflenet_table4.get_config(f'unit={unit},scale=0.5'))
            for unit in ('vgg', 'resnet', 'resnext')]
  assert widths + [stage4_width(shufflenet.get_config('groups=1,scale=0.5'))] == [50, 192, 192, 288]


def test_table4_units():
  """VGG-like: two 3x3 convolutions and no shortcut; ResNet: bottleneck C / 4 with a projection
  in stride-2 units only; ResNeXt: bottleneck C / 2 in 16 groups (Stage 2's 24 -> 32)."""
  def params(unit):
    config = shufflenet_table4.get_config(f'unit={unit},scale=0.5')
    return jax.eval_shape(functools.partial(models.get_model(config).init, train=False),
                          jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))['params']
  vgg, resnet, resnext = params('vgg'), params('resnet'), params('resnext')
  assert set(vgg['stage2_unit1']) == {'conv1', 'conv2'}
  assert vgg['stage4_unit1']['conv1']['conv']['kernel'].shape == (3, 3, 25, 50)
  assert resnet['stage2_unit1']['projection']['conv']['kernel'].shape == (1, 1, 12, 48)
  assert 'projection' not in resnet['stage2_unit2']
  assert resnet['stage4_unit2']['conv']['conv']['kernel'].shape == (3, 3, 48, 48)
  assert resnext['stage2_unit2']['conv']['conv']['kernel'].shape == (3, 3, 2, 32)
  assert resnext['stage4_unit2']['conv']['conv']['kernel'].shape == (3, 3, 6, 96)


@pytest.mark.parametrize('setting,value,message', [
    ('model.alpha', 0.75, 'not a complexity level'),
    ('model.zero_init_residual', True, 'has none'),
])
def test_table4_bad_settings(setting, value, message):
  config = shufflenet_table4.get_config('unit=vgg')
  config.model[setting.split('.')[1]] = value
  with pytest.raises(ValueError, match=message):
    models.get_model(config)


@pytest.mark.parametrize('config,setting,value,message', [
    (squeezenet.get_config(), 'version', '1.2', 'model.version must be one of 1.0, 1.1'),
    (squeezenet.get_config(), 'bypass', 'full', 'model.bypass must be one of none, simple'),
    (squeezenet.get_config(), 'alpha', 0.5, 'no width multiplier'),
    (xception.get_config(), 'alpha', 0.5, 'no width multiplier'),
    (xception.get_config(), 'small_input', True, 'no small_input'),
])
def test_seed_networks_bad_settings(config, setting, value, message):
  config.model[setting] = value
  with pytest.raises(ValueError, match=message):
    models.get_model(config)


def test_squeezenet_image_size_error():
  config = squeezenet.get_config('res=16')
  with pytest.raises(ValueError, match='image_size=16 is too small for SqueezeNet 1.0: use '
                                       'image_size >= 21'):
    models.get_model(config)


def test_squeezenet_trains_checkpoints_and_resumes_without_batchnorm(tmp_path):
  """A network without BatchNorm statistics (an empty collection) trains, evaluates, keeps moving
  averages, checkpoints and resumes through train.py."""
  config = squeezenet.get_config('res=32')
  for field, value in TINY.items():
    if not field.startswith('model.'):
      default.set_field(config, field, value)
  config.learning_rate = 0.01
  config.num_train_steps = 4
  train.train_and_evaluate(config, str(tmp_path))
  config.num_train_steps = 6
  train.train_and_evaluate(config, str(tmp_path))
  metrics = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  evals = [m for m in metrics if m['split'] == 'eval']
  assert [m['step'] for m in evals] == [4, 6]
  assert all(math.isfinite(m['loss']) and math.isfinite(m['ema_loss']) for m in evals)


@pytest.mark.parametrize('config,res', [
    (xception.get_config('res=32'), 32),
    (shufflenet_table4.get_config('unit=vgg,scale=1.0'), 64),
    (shufflenet_table4.get_config('unit=resnext,scale=0.25'), 64),
    (squeezenet.get_config('version=1.1,bypass=complex'), 64),
])
def test_train_mode_forward_and_gradients_are_finite(config, res):
  """Train mode (batch statistics, dropout) and the gradient of every parameter, at the smallest
  inputs the networks take (Xception: 32 px; SqueezeNet 1.1 with complex bypass)."""
  config.num_classes = 10
  model = models.get_model(config)
  variables = random_variables(model, res)
  images = jax.random.normal(jax.random.key(0), (2, res, res, 3))
  def loss(params):
    logits, state = model.apply({**variables, 'params': params}, images, train=True,
                                mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})
    return jnp.mean(logits ** 2), state
  grads, state = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert sum(float(np.abs(g).sum()) > 0 for g in jax.tree.leaves(grads)) == len(
      jax.tree.leaves(grads))
  assert jax.tree.structure(state.get('batch_stats', {})) == jax.tree.structure(
      variables.get('batch_stats', {}))


def test_table4_int8_export_has_calibrated_scales(tmp_path):
  """The int8 LiteRT file of a Table 4 structure: every int8 tensor has a usable scale (a -inf
  max-pool padding once gave the stem's output a scale of 1e36, which XNNPACK refused)."""
  import export  # pylint: disable=g-import-not-at-top
  from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top
  config = shufflenet_table4.get_config('unit=resnet,scale=0.25,res=64')
  variables = random_variables(models.get_model(config), 64)
  images = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
  path = tmp_path / 'int8.tflite'
  path.write_bytes(export.convert(config, variables, 'int8', images))
  interpreter = litert.Interpreter(
      model_path=str(path),
      experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  scales = [t['quantization'][0] for t in interpreter.get_tensor_details()
            if t['dtype'] == np.int8 and t['shape'].size == 4]
  assert scales and max(scales) < 1e3, max(scales)
