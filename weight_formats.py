"""Published weights in and out: TF-slim and Keras MobileNets, Keras Xception, pytorchcv ShuffleNets
and SqueezeNets.

Every network here is `ConvBN` blocks plus a classifier, so a format is described by two things:
where each of our blocks lives in the source (`LAYER_NAMES`: our module path -> the source's
convolution and BatchNorm names) and how the source names and lays out a block's tensors
(`Format`). `import_variables` fills our variable tree from a flat {name: array} dict of the
source and `published_variables` does the reverse; both check every name and shape first.

Layouts: our convolution kernels are HWIO with I = input channels / groups (depthwise: (k, k, 1,
C)); TF and Keras store depthwise kernels as (k, k, C, 1) and PyTorch every kernel as OIHW. TF-slim
and Keras V1 classifiers are 1x1 convolutions, (1, 1, C, K) for our dense (C, K). SqueezeNet's
convolutions have biases and no BatchNorm, and its classifier is a convolution.
"""

import collections
import dataclasses
import re
from typing import Callable, Optional

import flax
import numpy as np

@dataclasses.dataclass(frozen=True)
class Format:
  """How one library names and lays out the tensors of a block.

  `conv`, `bn` and `dense` give the source names of (our leaf -> source suffix); the `*_perm`
  fields are the axis orders that take a source tensor to ours (before a reshape to our shape).
  """
  sep: str
  conv: str
  depthwise_conv: str
  bn: dict
  dense: dict
  conv_perm: tuple
  depthwise_perm: tuple
  dense_perm: tuple
  # Source names that carry no weights (PyTorch's BatchNorm step counters).
  ignore: Optional[str] = None
  conv_bias: str = 'bias'


TF_BN = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean', 'var': 'moving_variance'}
TORCH_BN = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}

FORMATS = {
    'tf_slim': Format('/', 'weights', 'depthwise_weights',
                      {k: f'BatchNorm/{v}' for k, v in TF_BN.items()},
                      {'kernel': 'weights', 'bias': 'biases'},
                      (0, 1, 2, 3), (0, 1, 3, 2), (0, 1, 2, 3)),
    'keras': Format('/', 'kernel', 'kernel', TF_BN, {'kernel': 'kernel', 'bias': 'bias'},
                    (0, 1, 2, 3), (0, 1, 3, 2), None),
    'pytorchcv': Format('.', 'weight', 'weight', TORCH_BN,
                        {'kernel': 'weight', 'bias': 'bias'},
                        (2, 3, 1, 0), (2, 3, 1, 0), (1, 0), ignore=r'.*num_batches_tracked'),
}


def _rule(pattern: str, template: Callable[[re.Match], tuple[str, str]]):
  return re.compile(pattern), template


# (format, model) -> rules (regex on our '/'-joined block path -> (conv name, BatchNorm name), and
# the name of the conv's kernel where it is not the format's: Keras's separable convolutions hold a
# 'depthwise_kernel' and a 'pointwise_kernel') and the classifier's source name.
LAYER_NAMES = {
    ('tf_slim', 'mobilenet_v1'): ([
        _rule(r'stem', lambda m: ('MobilenetV1/Conv2d_0',) * 2),
        _rule(r'block(\d+)_(depthwise|pointwise)',
                  lambda m: (f'MobilenetV1/Conv2d_{m[1]}_{m[2]}',) * 2),
    ], 'MobilenetV1/Logits/Conv2d_1c_1x1'),
    ('tf_slim', 'mobilenet_v2'): ([
        _rule(r'stem', lambda m: ('MobilenetV2/Conv',) * 2),
        _rule(r'block0/(\w+)', lambda m: (f'MobilenetV2/expanded_conv/{m[1]}',) * 2),
        _rule(r'block(\d+)/(\w+)',
                  lambda m: (f'MobilenetV2/expanded_conv_{m[1]}/{m[2]}',) * 2),
        _rule(r'last_conv', lambda m: ('MobilenetV2/Conv_1',) * 2),
    ], 'MobilenetV2/Logits/Conv2d_1c_1x1'),
    ('keras', 'mobilenet_v1'): ([
        _rule(r'stem', lambda m: ('conv1', 'conv1_bn')),
        _rule(r'block(\d+)_(depthwise|pointwise)',
                  lambda m: (f'conv_{m[2][0]}w_{m[1]}', f'conv_{m[2][0]}w_{m[1]}_bn')),
    ], 'conv_preds'),
    ('keras', 'mobilenet_v2'): ([
        _rule(r'stem', lambda m: ('Conv1', 'bn_Conv1')),
        _rule(r'block0/(\w+)',
                  lambda m: (f'expanded_conv_{m[1]}', f'expanded_conv_{m[1]}_BN')),
        _rule(r'block(\d+)/(\w+)',
                  lambda m: (f'block_{m[1]}_{m[2]}', f'block_{m[1]}_{m[2]}_BN')),
        _rule(r'last_conv', lambda m: ('Conv_1', 'Conv_1_bn')),
    ], 'predictions'),
    ('keras', 'xception'): ([
        _rule(r'block1_conv(\d)', lambda m: (f'block1_conv{m[1]}', f'block1_conv{m[1]}_bn')),
        _rule(r'block(\d+)[/_]sepconv(\d)/depthwise',
              lambda m: (f'block{m[1]}_sepconv{m[2]}', None, 'depthwise_kernel')),
        _rule(r'block(\d+)[/_]sepconv(\d)/pointwise',
              lambda m: (f'block{m[1]}_sepconv{m[2]}', f'block{m[1]}_sepconv{m[2]}_bn',
                         'pointwise_kernel')),
        # Keras leaves the strided blocks' shortcut convolutions unnamed (keras_weights).
        _rule(r'block(\d+)/shortcut', lambda m: (
            f'conv2d{XCEPTION_SHORTCUTS[int(m[1])]}',
            f'batch_normalization{XCEPTION_SHORTCUTS[int(m[1])]}')),
    ], 'predictions'),
    **{('pytorchcv', f'squeezenet_v{version}'): ([
        _rule(r'conv1', lambda m: ('features.init_block.conv', None)),
        _rule(r'fire(\d)/(squeeze|expand1x1|expand3x3)', lambda m, units=units: (
            f'features.stage{units[int(m[1])][0]}.unit{units[int(m[1])][1]}.{m[2]}.conv', None)),
    ], 'output.final_conv') for version, units in (
        # Fire module -> (stage, unit): pytorchcv's stage i holds the modules after max pool i.
        ('1.0', {2: (1, 1), 3: (1, 2), 4: (1, 3), 5: (2, 1), 6: (2, 2), 7: (2, 3), 8: (2, 4),
                 9: (3, 1)}),
        ('1.1', {2: (1, 1), 3: (1, 2), 4: (2, 1), 5: (2, 2), 6: (3, 1), 7: (3, 2), 8: (3, 3),
                 9: (3, 4)}))},
    ('pytorchcv', 'shufflenet'): ([
        _rule(r'stem', lambda m: ('features.init_block.conv', 'features.init_block.bn')),
        _rule(r'stage(\d)_unit(\d+)/(compress|depthwise|expand)', lambda m: tuple(
            f'features.stage{int(m[1]) - 1}.unit{m[2]}.{part}'
            for part in {'compress': ('compress_conv1', 'compress_bn1'),
                         'depthwise': ('dw_conv2', 'dw_bn2'),
                         'expand': ('expand_conv3', 'expand_bn3')}[m[3]])),
    ], 'output'),
}

# Ablation settings whose variants a format publishes, with their values (pytorchcv's
# squeezeresnet_v1_0 and _v1_1 are SqueezeNet with simple bypass).
FORMAT_VARIANTS = {('pytorchcv', 'squeezenet'): {'version': ('1.0', '1.1'),
                                                 'bypass': ('none', 'simple')}}

# Keras's names of Xception's unnamed shortcut layers, by block (the names of a fresh session).
XCEPTION_SHORTCUTS = {2: '', 3: '_1', 4: '_2', 13: '_3'}

# What each format's published weights expect, applied to the config of a converted checkpoint:
# TF and Keras MobileNets take inputs in [-1, 1] and use BatchNorm epsilon 1e-3; pytorchcv
# normalizes with the ImageNet channel means and deviations and keeps PyTorch's 1e-5.
TF_SETTINGS = {'model.bn_epsilon': 1e-3, 'normalization_mean': (127.5,) * 3,
               'normalization_std': (127.5,) * 3}
FORMAT_SETTINGS = {
    'tf_slim': TF_SETTINGS,
    'keras': TF_SETTINGS,
    'pytorchcv': {'model.bn_epsilon': 1e-5, 'model.shortcut_first': False,
                  'normalization_mean': (123.675, 116.28, 103.53),
                  'normalization_std': (58.395, 57.12, 57.375)},
}


def network(config) -> str:
  """The name under which LAYER_NAMES holds `config`'s network: the model's, with SqueezeNet's
  version ('squeezenet_v1.1'), whose layers pytorchcv names by stage."""
  name = config.model.name
  return f'{name}_v{config.model.version}' if name == 'squeezenet' else name


def supported(fmt: str, model_name: str) -> None:
  """Raises ValueError unless `fmt` can carry `model_name`'s weights."""
  if fmt not in FORMATS:
    raise ValueError(f'Unknown format {fmt!r}; valid formats: {", ".join(FORMATS)}.')
  if (fmt, model_name) not in LAYER_NAMES:
    known = sorted(m for f, m in LAYER_NAMES if f == fmt)
    raise ValueError(f'The {fmt} format has no {model_name}; it has: {", ".join(known)}.')


def _block_names(fmt: str, model_name: str, block: str) -> tuple[str, ...]:
  rules, _ = LAYER_NAMES[fmt, model_name]
  for pattern, template in rules:
    match = pattern.fullmatch(block)
    if match:
      return template(match)
  raise ValueError(f'No {fmt} name for the {model_name} layer {block!r}.')


def source_names(fmt: str, model_name: str, shapes: dict) -> dict:
  """{our leaf path: (source name, axis order)} for every leaf of `shapes`
  ({'params': ..., 'batch_stats': ...}, as `model.init` returns)."""
  form = FORMATS[fmt]
  head = LAYER_NAMES[fmt, model_name][1]
  names = {}
  for path, shape in flax.traverse_util.flatten_dict(shapes).items():
    _, *module, leaf = path
    if module[:2] == ['head', 'classifier']:
      kernel_perm = form.conv_perm if len(shape.shape) == 4 else form.dense_perm
      names[path] = (f'{head}{form.sep}{form.dense[leaf]}',
                     kernel_perm if leaf == 'kernel' else (0,))
      continue
    block, part = '/'.join(module[:-1]), module[-1]
    conv, bn, *kernel = _block_names(fmt, model_name, block)
    if part == 'conv' and leaf == 'bias':
      names[path] = (f'{conv}{form.sep}{form.conv_bias}', (0,))
    elif part == 'conv':
      depthwise = block.endswith('depthwise')
      kernel = kernel[0] if kernel else form.depthwise_conv if depthwise else form.conv
      names[path] = (f'{conv}{form.sep}{kernel}',
                     form.depthwise_perm if depthwise else form.conv_perm)
    else:
      names[path] = (f'{bn}{form.sep}{form.bn[leaf]}', (0,))
  return names


def _fits(shape: tuple, target: tuple) -> bool:
  """Whether `shape` is `target` with leading ones (a 1x1 convolution for a dense layer)."""
  extra = len(shape) - len(target)
  return extra >= 0 and tuple(shape[extra:]) == tuple(target) and all(d == 1 for d in shape[:extra])


def _transposed_shape(shape, perm) -> tuple:
  return tuple(shape[p] for p in perm) if perm is not None else tuple(shape)


def _list(names, limit: int = 5) -> str:
  names = sorted(names)
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more if names else 'none'


def import_variables(fmt: str, model_name: str, source: dict, shapes: dict) -> dict:
  """Our {'params', 'batch_stats'} tree filled from `source` ({name: array}).

  Raises ValueError listing the first missing and unexpected names, or the first tensors whose
  shapes differ, before anything is converted. TF-slim checkpoints written without BatchNorm
  scales (no `gamma` anywhere) get scales of one.
  """
  names = source_names(fmt, model_name, shapes)
  flat_shapes = flax.traverse_util.flatten_dict(shapes)
  form = FORMATS[fmt]
  wanted = {name for name, _ in names.values()}
  available = {k for k in source if not (form.ignore and re.fullmatch(form.ignore, k))}
  no_scales = fmt == 'tf_slim' and not any(k.endswith('/gamma') for k in available)
  missing = {n for n in wanted - available if not (no_scales and n.endswith('/gamma'))}
  unexpected = available - wanted
  if missing or unexpected:
    raise ValueError(
        f'The {fmt} weights do not match this {model_name}: missing {_list(missing)}; '
        f'unexpected {_list(unexpected)}. Check the --config (model, alpha, groups) against the '
        'weights.')
  mismatched = []
  flat = {}
  for path, (name, perm) in names.items():
    target = tuple(flat_shapes[path].shape)
    if name not in source:  # a scale of a checkpoint without scales
      flat[path] = np.ones(target, np.float32)
      continue
    value = np.asarray(source[name], np.float32)
    moved = np.transpose(value, perm) if perm is not None else value
    if not _fits(moved.shape, target):
      mismatched.append(f'{name} {value.shape} for {"/".join(path)} {target}')
      continue
    flat[path] = moved.reshape(target)
  if mismatched:
    raise ValueError(
        f'{len(mismatched)} {fmt} tensors have other shapes than this {model_name} needs, e.g. '
        f'{"; ".join(mismatched[:3])}. Check model.alpha, model.groups and num_classes.')
  return flax.traverse_util.unflatten_dict(flat)


def published_variables(fmt: str, model_name: str, variables: dict,
                     source_shapes: dict) -> dict:
  """The inverse of `import_variables`: {source name: array} in the layouts of `source_shapes`
  ({source name: shape}), which must name exactly our tensors."""
  names = source_names(fmt, model_name, variables)
  wanted = {name for name, _ in names.values()}
  missing, unexpected = set(source_shapes) - wanted, wanted - set(source_shapes)
  if missing or unexpected:
    raise ValueError(f'The {fmt} model does not match this {model_name}: it has '
                     f'{_list(missing)} that ours lacks, and lacks {_list(unexpected)}.')
  out = {}
  for path, value in flax.traverse_util.flatten_dict(variables).items():
    name, perm = names[path]
    shape = tuple(source_shapes[name])
    value = np.asarray(value, np.float32).reshape(_transposed_shape(shape, perm))
    out[name] = np.transpose(value, np.argsort(perm)) if perm is not None else value
  return out


def fold_bn_epsilon(variables: dict, epsilon: float, target_epsilon: float) -> dict:
  """Variables whose BatchNorm variances give the same outputs under `target_epsilon`:
  var + epsilon - target_epsilon, since BatchNorm divides by sqrt(var + epsilon)."""
  flat = flax.traverse_util.flatten_dict(variables)
  return flax.traverse_util.unflatten_dict({
      path: value + epsilon - target_epsilon if path[0] == 'batch_stats' and path[-1] == 'var'
      else value for path, value in flat.items()})


# Readers: a file in each format -> {name: numpy array}.

def read_tf_slim(path: str) -> dict:
  """Model variables of a TF checkpoint; where it keeps moving averages of them, the averages
  (what TF-slim evaluates). Optimizer slots and the step counter are left out."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    reader = tf.train.load_checkpoint(path)
  except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as e:
    raise ValueError(f'{path} is not a TensorFlow checkpoint ({e}). Give the prefix, e.g. '
                     'mobilenet_v1_1.0_224.ckpt, not one of its .index/.data files.') from e
  names = reader.get_variable_to_shape_map()
  weights = {}
  for name in names:
    if not re.search(r'ExponentialMovingAverage|/RMSProp|/Momentum|global_step', name):
      average = f'{name}/ExponentialMovingAverage'
      weights[name] = reader.get_tensor(average if average in names else name)
  return weights


def keras_application(config, weights: Optional[str] = None):
  """The Keras applications network equal to `config`'s MobileNet or Xception (logits out)."""
  import keras  # pylint: disable=g-import-not-at-top
  builder = {'mobilenet_v1': keras.applications.MobileNet,
             'mobilenet_v2': keras.applications.MobileNetV2,
             'xception': keras.applications.Xception}.get(config.model.name)
  if builder is None:
    raise ValueError(f'Keras applications have no {config.model.name}; the keras format takes '
                     'mobilenet_v1, mobilenet_v2 and xception.')
  width = {} if config.model.name == 'xception' else {'alpha': config.model.alpha}
  model = builder(input_shape=(config.image_size, config.image_size, 3), weights=None,
                  classes=config.num_classes, classifier_activation=None, **width)
  if weights is not None:
    try:
      model.load_weights(weights)
    except (ValueError, OSError, KeyError) as e:
      raise ValueError(
          f'Could not load {weights} into Keras {builder.__name__}(alpha={config.model.alpha}, '
          f'classes={config.num_classes}): {" ".join(str(e).split())[:300]}. Check model.alpha '
          'and num_classes '
          'against the file.') from e
  return model


def keras_layer_names(model) -> list[str]:
  """The names of `model`'s layers as a fresh Keras session gives them: an unnamed layer is named
  by its class and a counter ('conv2d', 'conv2d_1', ...) that grows with every such layer the
  process has built, so those are numbered again in the model's order."""
  counts = collections.Counter()
  names = []
  for layer in model.layers:
    match = re.fullmatch(r'(conv2d|batch_normalization)(_\d+)?', layer.name)
    if match:
      names.append(match[1] + (f'_{counts[match[1]]}' if counts[match[1]] else ''))
      counts[match[1]] += 1
    else:
      names.append(layer.name)
  return names


def keras_weights(model) -> dict:
  return {f'{name}/{weight.name}': np.asarray(weight.numpy())
          for name, layer in zip(keras_layer_names(model), model.layers)
          for weight in layer.weights}


def set_keras_weights(model, values: dict) -> None:
  """Assigns {'layer/weight': array} (keras_weights' names) to the Keras `model`."""
  for name, layer in zip(keras_layer_names(model), model.layers):
    if layer.weights:
      layer.set_weights([values[f'{name}/{w.name}'] for w in layer.weights])


def read_keras(path: str, config) -> dict:
  return keras_weights(keras_application(config, path))


def read_pytorchcv(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError('Reading pytorchcv weights needs PyTorch: pip install torch.') from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  state = state.get('state_dict', state)
  return {name: tensor.numpy() for name, tensor in state.items()}


def read(fmt: str, path: str, config) -> dict:
  """{name: array} of the weights file `path` in format `fmt`."""
  if fmt == 'tf_slim':
    return read_tf_slim(path)
  if fmt == 'keras':
    return read_keras(path, config)
  return read_pytorchcv(path)
