"""Converted weights compute what the peer implementations compute.

Peers with random weights (and random BatchNorm statistics, so that no layer is the identity):
Keras applications MobileNet and MobileNetV2, through a Keras weights file and through a TF
checkpoint with TF-slim's variable names, and pytorchcv's ShuffleNet through a state dict. Then the
converted workdir end to end: train.py evaluation and fine-tuning, predict.py and the export back
to Keras.
"""

import functools
import json
import os
import re

import flax
import jax
import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import torch
from pytorchcv.models import shufflenet as pytorchcv_shufflenet
from pytorchcv.models.common import tutti as pytorchcv_tutti

import convert
import weight_formats
import input_pipeline
import models
import predict
import train
import workdirs
from configs import mobilenet_v1, mobilenet_v2, shufflenet
from tests.helpers import run_tool, tiny_config


CONFIGS = {'mobilenet_v1': mobilenet_v1, 'mobilenet_v2': mobilenet_v2}


def randomize_keras(model, seed=0):
  """He-normal kernels, random BatchNorm scales, offsets and statistics, random biases."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    values = []
    for weight in layer.weights:
      shape = tuple(weight.shape)
      if weight.name == 'kernel':
        fan_in = np.prod(shape[:-1]) if len(shape) == 2 else (
            np.prod(shape[:2]) * (1 if isinstance(layer, keras.layers.DepthwiseConv2D)
                                  else shape[2]))
        values.append(rng.normal(0, np.sqrt(2 / fan_in), shape))
      elif weight.name in ('gamma', 'moving_variance'):
        values.append(rng.uniform(0.5, 1.5, shape))
      else:
        values.append(rng.normal(0, 0.1, shape))
    if values:
      layer.set_weights([v.astype(np.float32) for v in values])
  return model


def slim_name(model_name, keras_name):
  """The TF-slim variable name of a Keras MobileNet weight, written out independently of
  weight_formats.py: 'conv_dw_3/kernel' -> 'MobilenetV1/Conv2d_3_depthwise/depthwise_weights'."""
  layer, weight = keras_name.split('/')
  if model_name == 'mobilenet_v1':
    scope = 'MobilenetV1'
    layer = re.sub(r'^conv1', 'Conv2d_0', layer)
    layer = re.sub(r'^conv_dw_(\d+)', r'Conv2d_\1_depthwise', layer)
    layer = re.sub(r'^conv_pw_(\d+)', r'Conv2d_\1_pointwise', layer)
    layer = layer.replace('conv_preds', 'Logits/Conv2d_1c_1x1').replace('_bn', '/BatchNorm')
  else:
    scope = 'MobilenetV2'
    layer = {'Conv1': 'Conv', 'bn_Conv1': 'Conv/BatchNorm', 'Conv_1_bn': 'Conv_1/BatchNorm',
             'predictions': 'Logits/Conv2d_1c_1x1'}.get(layer, layer)
    layer = re.sub(r'^expanded_conv_(\w+?)(_BN)?$', r'expanded_conv/\1\2', layer)
    layer = re.sub(r'^block_(\d+)_(\w+?)(_BN)?$', r'expanded_conv_\1/\2\3', layer)
    layer = layer.replace('_BN', '/BatchNorm')
  if weight == 'kernel':
    weight = 'depthwise_weights' if layer.endswith('depthwise') else 'weights'
  return f'{scope}/{layer}/{"biases" if weight == "bias" else weight}'


def write_slim_checkpoint(keras_model, model_name, prefix):
  names, tensors = [], []
  for name, value in weight_formats.keras_weights(keras_model).items():
    name = slim_name(model_name, name)
    if name.endswith('Conv2d_1c_1x1/weights') and value.ndim == 2:
      value = value[None, None]  # TF-slim's classifier is a 1x1 convolution
    names.append(name)
    tensors.append(tf.constant(value))
  names.append('global_step')  # not a weight: must be ignored
  tensors.append(tf.constant(7, tf.int64))
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[''] * len(names),
                    tensors=tensors)


def converted_logits(workdir, images):
  config = ml_collections.ConfigDict(workdirs.read_config(workdir))
  variables, _ = workdirs.restore_variables(workdir)
  model = models.get_model(config)
  logits = jax.jit(functools.partial(model.apply, train=False))(
      {'params': variables['params'], 'batch_stats': variables['batch_stats']}, images)
  return config, variables, np.asarray(logits)


def assert_same_logits(ours, theirs):
  scale = np.abs(theirs).max()
  assert scale > 1.0  # random weights that still give spread-out logits
  assert np.abs(ours - theirs).max() <= 1e-4 * scale, np.abs(ours - theirs).max() / scale


def parameter_count(variables):
  return sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(variables['params']))


KERAS_VARIANTS = ([('mobilenet_v1', a, r) for a in (0.25, 0.5, 0.75, 1.0) for r in (224, 128)] +
                  [('mobilenet_v2', a, r) for a in (0.35, 0.5, 1.0, 1.4) for r in (224, 96)])


@pytest.mark.parametrize('model_name,alpha,res', KERAS_VARIANTS)
def test_keras_and_tf_slim_weights_give_keras_logits(model_name, alpha, res, tmp_path):
  config = CONFIGS[model_name].get_config(f'alpha={alpha},res={res}')
  config.num_classes = 1001
  peer = randomize_keras(weight_formats.keras_application(config), seed=int(alpha * 100) + res)
  images = np.random.default_rng(1).uniform(-1, 1, (2, res, res, 3)).astype(np.float32)
  expected = np.asarray(peer(images, training=False))

  peer.save_weights(tmp_path / 'peer.weights.h5')
  convert.import_weights('keras', str(tmp_path / 'peer.weights.h5'), config, str(tmp_path / 'ours'))
  converted, variables, logits = converted_logits(tmp_path / 'ours', images)
  assert_same_logits(logits, expected)
  assert parameter_count(variables) == sum(int(np.prod(w.shape)) for w in peer.trainable_weights)
  assert converted.model.bn_epsilon == 1e-3
  assert tuple(converted.normalization_mean) == (127.5,) * 3
  assert (converted.num_classes, converted.label_offset) == (1001, 0)

  # The TF-slim path gives the same variables (so the same logits), and the class offset.
  write_slim_checkpoint(peer, model_name, str(tmp_path / 'peer.ckpt'))
  source = weight_formats.read('tf_slim', str(tmp_path / 'peer.ckpt'), config)
  slim_config = convert.converted_config('tf_slim', config, source)
  assert (slim_config.num_classes, slim_config.label_offset) == (1001, 1)
  assert slim_config.model.bn_epsilon == 1e-3
  slim = weight_formats.import_variables('tf_slim', model_name, source,
                                     models.variable_shapes(slim_config))
  jax.tree.map(np.testing.assert_array_equal, slim,
               {'params': variables['params'], 'batch_stats': variables['batch_stats']})


def pytorchcv_peer(groups, scale, seed=0):
  torch.manual_seed(seed)
  net = pytorchcv_shufflenet.get_shufflenet(groups=groups, width_scale=scale)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return net.eval()


def test_pytorchcv_channel_shuffle_is_the_papers():
  """The paper's shuffle: channels reshaped to (g, n), transposed, flattened; ours is the same."""
  x = np.arange(2 * 12 * 2 * 2, dtype=np.float32).reshape(2, 12, 2, 2)  # NCHW
  theirs = pytorchcv_tutti.channel_shuffle(torch.from_numpy(x), 3).numpy()
  paper = x.reshape(2, 3, 4, 2, 2).transpose(0, 2, 1, 3, 4).reshape(2, 12, 2, 2)
  ours = np.asarray(models.layers.channel_shuffle(x.transpose(0, 2, 3, 1), 3)).transpose(0, 3, 1, 2)
  np.testing.assert_array_equal(theirs, paper)
  np.testing.assert_array_equal(ours, paper)


# pytorchcv cannot build g = 8 at 0.5x: its stem of int(24 * 0.5) = 12 channels leaves 192 - 12 =
# 180 channels for the first unit's group convolution, which 8 groups do not divide (ours rounds
# the stem to 16, see models/shufflenet.py).
@pytest.mark.parametrize('groups,scale', [(1, 1.0), (3, 1.0), (8, 1.0), (1, 0.5), (3, 0.5)])
def test_pytorchcv_shufflenet_weights_give_pytorchcv_logits(groups, scale, tmp_path):
  peer = pytorchcv_peer(groups, scale)
  torch.save(peer.state_dict(), tmp_path / 'peer.pth')
  config = shufflenet.get_config(f'groups={groups},scale={scale}')
  convert.import_weights('pytorchcv', str(tmp_path / 'peer.pth'), config, str(tmp_path / 'ours'))
  images = np.random.default_rng(1).normal(0, 1, (2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    expected = peer(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  converted, variables, logits = converted_logits(tmp_path / 'ours', images)
  assert_same_logits(logits, expected)
  assert parameter_count(variables) == sum(p.numel() for p in peer.parameters())
  assert converted.model.shortcut_first is False
  assert converted.model.bn_epsilon == 1e-5

  # The concatenation order is part of the network: the official order gives other logits.
  converted.model.shortcut_first = True
  official = jax.jit(functools.partial(models.get_model(converted).apply, train=False))(
      {'params': variables['params'], 'batch_stats': variables['batch_stats']}, images)
  assert np.abs(np.asarray(official) - expected).max() > 1e-2 * np.abs(expected).max()


@pytest.mark.filterwarnings('ignore::UserWarning')  # Keras reports each layer it cannot load
def test_mismatched_weights_are_one_clear_error_and_write_nothing(tmp_path):
  config = mobilenet_v1.get_config('alpha=0.5,res=128')
  config.num_classes = 1001
  peer = randomize_keras(weight_formats.keras_application(config))
  write_slim_checkpoint(peer, 'mobilenet_v1', str(tmp_path / 'v1_0.5.ckpt'))
  peer.save_weights(tmp_path / 'v1_0.5.weights.h5')
  narrower = mobilenet_v1.get_config('alpha=0.25,res=128')
  with pytest.raises(ValueError, match=r'other shapes .* Check model.alpha'):
    convert.import_weights('tf_slim', str(tmp_path / 'v1_0.5.ckpt'), narrower,
                           str(tmp_path / 'out'))
  with pytest.raises(ValueError, match=r'missing MobilenetV2/Conv/BatchNorm/beta, .*'
                                       r'unexpected MobilenetV1/Conv2d_0/BatchNorm/beta'):
    convert.import_weights('tf_slim', str(tmp_path / 'v1_0.5.ckpt'),
                           mobilenet_v2.get_config('alpha=0.5,res=128'), str(tmp_path / 'out'))
  wider = mobilenet_v1.get_config('alpha=0.75,res=128')
  wider.num_classes = 1001
  with pytest.raises(ValueError, match='Check model.alpha and num_classes'):
    convert.import_weights('keras', str(tmp_path / 'v1_0.5.weights.h5'), wider,
                           str(tmp_path / 'out'))
  with pytest.raises(ValueError, match='has no shufflenet'):
    convert.import_weights('keras', 'x.h5', shufflenet.get_config(), str(tmp_path / 'out'))
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith('out')]
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'results.json').write_text('{}')
  with pytest.raises(ValueError, match='exists and is not empty'):
    convert.import_weights('tf_slim', str(tmp_path / 'v1_0.5.ckpt'), config,
                           str(tmp_path / 'taken'))
  assert os.listdir(tmp_path / 'taken') == ['results.json']


def test_tf_slim_checkpoint_without_batchnorm_scales_gets_ones():
  config = mobilenet_v1.get_config('alpha=0.25,res=128')
  config.num_classes = 1001
  peer = randomize_keras(weight_formats.keras_application(config))
  source = {slim_name('mobilenet_v1', k): v for k, v in weight_formats.keras_weights(peer).items()
            if not k.endswith('/gamma')}
  variables = weight_formats.import_variables('tf_slim', 'mobilenet_v1', source,
                                          models.variable_shapes(config))
  flat = flax.traverse_util.flatten_dict(variables['params'])
  scales = [v for k, v in flat.items() if k[-1] == 'scale']
  assert len(scales) == 27 and all(np.all(v == 1) for v in scales)
  np.testing.assert_array_equal(flat['stem', 'bn', 'bias'],
                                source['MobilenetV1/Conv2d_0/BatchNorm/beta'])


def write_png(path, seed, size):
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  tf.io.write_file(str(path), tf.io.encode_png(pixels))
  return pixels


@pytest.mark.slow
def test_converted_workdir_evaluates_fine_tunes_predicts_and_exports(tmp_path):
  config = tiny_config(num_classes=4)
  peer = randomize_keras(weight_formats.keras_application(config), seed=3)
  peer.save_weights(tmp_path / 'peer.weights.h5')
  workdir = str(tmp_path / 'converted')
  convert.import_weights('keras', str(tmp_path / 'peer.weights.h5'), config, workdir)

  # train.py --config.eval_only: the accuracy the Keras network has on the same batches.
  eval_config = tiny_config(eval_only=True, num_classes=1000, label_offset=0)
  result = train.train_and_evaluate(eval_config, workdir)
  data = input_pipeline.load(config)
  hits = count = 0
  for batch in input_pipeline.eval_batches(data, config):
    images = batch['image'].reshape(-1, *batch['image'].shape[2:])
    logits = np.asarray(peer(images, training=False))
    mask = batch['mask'].reshape(-1)
    hits += ((logits.argmax(-1) == batch['label'].reshape(-1)) * mask).sum()
    count += mask.sum()
  assert result['count'] == count == 20
  assert result['top1'] == pytest.approx(hits / count)
  assert json.load(open(os.path.join(workdir, 'eval_results.json')))['top1'] == result['top1']

  # Fine-tuning on 3 classes with a tiny learning rate: the backbone stays the converted one
  # (a fresh initialisation differs by ~0.1) and the classifier is new.
  tuned = str(tmp_path / 'tuned')
  train.train_and_evaluate(tiny_config(init_from=workdir, num_classes=3, learning_rate=1e-9,
                                       num_train_steps=3, ema_decay=0.0), tuned)
  start = flax.traverse_util.flatten_dict(workdirs.restore_variables(workdir)[0]['params'])
  end, step = workdirs.restore_variables(tuned)
  assert step == 3 and os.path.exists(os.path.join(tuned, 'results.json'))
  for name, value in flax.traverse_util.flatten_dict(end['params']).items():
    if name[0] == 'head':
      assert value.shape[-1] == 3
    else:
      np.testing.assert_allclose(value, start[name], atol=1e-6)
  with pytest.raises(ValueError, match="holds a model.name='mobilenet_v1' network"):
    train.train_and_evaluate(tiny_config(init_from=workdir, **{'model.name': 'mobilenet_v2'}),
                             str(tmp_path / 'wrong'))

  # predict.py: probabilities of the Keras network on the center crop, best first.
  pixels = write_png(tmp_path / 'a.png', 0, 32)
  write_png(tmp_path / 'b.png', 1, 32)
  out = predict.predict(workdir, [str(tmp_path / 'a.png'), str(tmp_path / 'b.png')], top_k=3)
  expected = np.asarray(keras.ops.softmax(peer(pixels[None] / 127.5 - 1.0, training=False)))[0]
  top = out[0]['top']
  assert [t['label'] for t in top] == list(np.argsort(-expected)[:3])
  np.testing.assert_allclose([t['probability'] for t in top], np.sort(expected)[::-1][:3],
                             atol=1e-5)
  (tmp_path / 'broken.jpg').write_text('not an image')
  cli = run_tool('predict.py', f'--workdir={workdir}', '--json', tmp_path / 'broken.jpg',
                 tmp_path / 'b.png')
  broken, good = json.loads(cli.stdout)
  assert len(good['top']) == 4  # --top_k 5 of 4 classes
  assert [t['label'] for t in good['top'][:3]] == [t['label'] for t in out[1]['top']]
  # The file that is not an image: one line that names it, after the other image's result.
  assert cli.returncode == 1 and 'Traceback' not in cli.stderr
  assert broken['error'] == cli.stderr.strip().splitlines()[-1].removeprefix('error: ') == (
      f'{tmp_path / "broken.jpg"} is not a JPEG, PNG, GIF or BMP image: remove it or replace it.')

  # Export back to Keras reproduces the peer's logits.
  convert.write_keras(workdir, str(tmp_path / 'out.weights.h5'))
  back = weight_formats.keras_application(config)
  back.load_weights(tmp_path / 'out.weights.h5')
  images = np.random.default_rng(2).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(back(images, training=False), peer(images, training=False),
                             atol=1e-5)


def test_export_of_another_batchnorm_epsilon_keeps_the_function(tmp_path):
  """A network trained with epsilon 1e-5 exports with shifted variances for Keras' 1e-3."""
  config = mobilenet_v2.get_config('alpha=0.35,res=96')
  config.model.bn_epsilon = 1e-5
  peer = randomize_keras(weight_formats.keras_application(config), seed=5)
  variables = weight_formats.import_variables('keras', 'mobilenet_v2', weight_formats.keras_weights(peer),
                                          models.variable_shapes(config))
  images = np.random.default_rng(2).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(functools.partial(models.get_model(config).apply, train=False))(
      variables, images))
  folded = weight_formats.fold_bn_epsilon(variables, 1e-5, 1e-3)
  shapes = {k: v.shape for k, v in weight_formats.keras_weights(peer).items()}
  values = weight_formats.published_variables('keras', 'mobilenet_v2', folded, shapes)
  weight_formats.set_keras_weights(peer, values)
  assert_same_logits(ours, np.asarray(peer(images, training=False)))
