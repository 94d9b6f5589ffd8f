"""Defaults shared by every config, the parser for the short argument strings and the one way to
read and write a dotted field ('model.alpha'). Configs are data: the command line is cli.py's.

A config file's `get_config(arg)` receives what follows the colon in
`--config=configs/mobilenet_v2.py:alpha=0.5,res=160`; `parse_arg` turns it into typed values.
"""

import ml_collections
from ml_collections.config_flags import config_path


def get_field(config, field: str, default=None):
  """The value of the dotted `field` of a ConfigDict or of a dict read from config.json;
  `default` where it has no such field."""
  try:
    return config_path.get_value(field, config)
  except (KeyError, AttributeError):
    return default


def set_field(config: ml_collections.ConfigDict, field: str, value, create: bool = False) -> None:
  """Sets the dotted `field` (a float field takes ints, a tuple field lists); ValueError if it is
  not a field of `config` and `create` is False."""
  try:
    config_path.set_value(field, config, value, accept_new_attributes=create)
  except (KeyError, AttributeError) as e:
    raise ValueError(f'{field!r} is not a config field.') from e


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key=value' into a ConfigDict, typed like `defaults`.

  Only keys present in `defaults` are accepted, so a typo is an error rather than a silent no-op.
  """
  values = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f'Bad config argument {item!r}: expected key=value with key in '
                       f'{sorted(defaults)}.')
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'Config argument {key} must be true or false, got {value!r}.')
      values[key] = value.lower() in ('true', '1')
    else:
      values[key] = kind(value)
  return values


# The ablation settings of each network and the value that builds the paper's main network:
# MobileNet V1 Tables 4 and 5, MobileNet V2 Figure 6, ShuffleNet Tables 3 and 5, SqueezeNet Table 3
# (and its v1.1, which differs from the paper's network).
ABLATIONS = {
    'mobilenet_v1': {'separable': True, 'shallow': False},
    'mobilenet_v2': {'bottleneck_activation': 'linear', 'shortcut': 'bottleneck'},
    'shufflenet': {'channel_shuffle': True, 'shallow': False, 'se_reduction': 0},
    'squeezenet': {'version': '1.0', 'bypass': 'none'},
}
ABLATION_FIELDS = tuple(sorted({f'model.{field}' for fields in ABLATIONS.values()
                                for field in fields}))

def changed_ablations(model) -> dict:
  """{field: value} of the ablation settings in which `model` (config.model, or the 'model' of a
  config.json) differs from its paper's main network; {} for the main network."""
  main = ABLATIONS.get(model.get('name'), {})
  return {field: model.get(field) for field in main
          if field in model and model.get(field) != main[field]}


def set_model(config: ml_collections.ConfigDict, name: str, alpha: float,
              groups: int = 3) -> None:
  """Selects the network and its width (ShuffleNet: scale s and groups g)."""
  config.model.name = name
  config.model.alpha = alpha
  if name in ('mobilenet_v2', 'shufflenet'):
    # BatchNorm scale 0 at the end of residual branches (models/layers.py); off in the papers.
    config.model.zero_init_residual = False
  # The papers' ablations (ABLATIONS), each off by default; see the model's docstring.
  for field, value in ABLATIONS.get(name, {}).items():
    config.model[field] = value
  if name == 'shufflenet':
    config.model.groups = groups
    # Stride-2 units: pooled shortcut before the branch (official); False for pytorchcv weights.
    config.model.shortcut_first = True


def set_rmsprop_recipe(config: ml_collections.ConfigDict, lr_decay_rate: float,
                       lr_decay_epochs: float) -> None:
  """The MobileNet papers' recipe: TF RMSProp (decay 0.9, momentum 0.9, epsilon 1.0), lr 0.045
  at a global batch of 96 x 16 GPUs decayed exponentially by epoch (staircase), L2 weight decay
  4e-5 with none on depthwise kernels (the default `weight_decay_exclude`), 300 epochs."""
  config.batch_size = 1536
  config.eval_batch_size = 1000
  config.num_epochs = 300.0
  config.optimizer = 'rmsprop'
  config.momentum = 0.9
  config.learning_rate = 0.045
  config.lr_reference_batch_size = 1536
  config.schedule = 'exponential'
  config.lr_decay_rate = lr_decay_rate
  config.lr_decay_epochs = lr_decay_epochs
  config.lr_staircase = True
  config.weight_decay = 4e-5
  config.weight_decay_type = 'l2'


def get_config() -> ml_collections.ConfigDict:
  """Fields every model config has; model configs override what differs."""
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.name = ''
  config.model.alpha = 1.0
  config.model.dropout_rate = 0.0
  # Remove the first two downsamplings (total stride 32 -> 8) for small images, as CIFAR ports do.
  config.model.small_input = False
  # Flax BatchNorm momentum is the decay of the running averages (PyTorch momentum 0.1 = 0.9 here).
  config.model.bn_momentum = 0.9
  config.model.bn_epsilon = 1e-5
  # Convolutions: 'auto' computes them with oneDNN on the CPU, where XLA's convolutions are slow
  # (models/layers.py: OneDNNConv; ShiftedConv's XLA products where the library is not built), and
  # with nn.Conv on accelerators. 'onednn', 'shifted' and 'xla' choose one (docs/performance.md).
  config.model.conv_impl = 'auto'

  config.dataset = 'imagenet2012'
  config.num_classes = 1000
  # Logit index of label 0: 1 for TF-slim's 1001-class models (index 0 = background).
  config.label_offset = 0
  # The resolution multiplier rho: image_size = 224 * rho.
  config.image_size = 224
  # bfloat16 compute with float32 parameters, BatchNorm statistics and optimizer state.
  config.half_precision = False

  # Data (see input_pipeline.py): a TFDS name[:version], 'folder:/path' or 'synthetic'.
  config.data_dir = ''  # TFDS data directory (local or a bucket); '' for TFDS's default
  config.download = False  # let TFDS download and prepare a missing data set
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.cache = False  # decode the splits once into host memory (small data sets)
  # Where the original Fashion-MNIST IDX files are ('fashion_mnist' is prepared from them offline).
  config.fashion_mnist_files = '/usr/share/datasets/fashion-mnist'
  config.folder_eval_fraction = 0.1  # 'folder:' data sets: share of each class held out
  config.synthetic_train_examples = 512
  config.synthetic_eval_examples = 100
  # 'inception_crop': random resized crop with area in [crop_area_min, 1], eval resize to
  # image_size / eval_crop_fraction and center crop. 'pad_crop' (32 px and below): resize to
  # image_size, pad by crop_padding and crop randomly; eval resize only. Both flip horizontally.
  config.augment = 'inception_crop'
  config.crop_area_min = 0.08
  # The training crop's resize: 'bilinear' without antialiasing as TF-slim's
  # inception_preprocessing (fast_mode), which trained the papers' releases, and 2.5x faster than
  # antialiased bicubic (docs/data.md). Evaluation resizes
  # bicubic, antialiased.
  config.train_resize_method = 'bilinear'
  config.train_resize_antialias = False
  config.eval_crop_fraction = 0.875
  config.crop_padding = 4
  config.normalization_mean = (127.5, 127.5, 127.5)  # [-1, 1], as TF's MobileNets expect
  config.normalization_std = (127.5, 127.5, 127.5)
  config.shuffle_buffer = 16_384  # examples, kept encoded: ~1.8 GB of ImageNet JPEGs
  config.prefetch_batches = 2
  config.data_threads = 0  # tf.data threads; 0 lets tf.data decide

  # Optimisation (see optimizers.py for the valid names).
  config.batch_size = 256  # global, split evenly over all devices
  config.eval_batch_size = 256
  config.num_epochs = 1.0
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.optimizer = 'sgd'
  config.learning_rate = 0.1
  config.lr_reference_batch_size = 0  # > 0: lr scaled by batch_size / lr_reference_batch_size
  config.momentum = 0.9
  config.nesterov = False
  config.rmsprop_decay = 0.9
  config.rmsprop_epsilon = 1.0
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_epsilon = 1e-8
  config.schedule = 'cosine'
  config.warmup_epochs = 0.0
  config.lr_decay_rate = 0.98
  config.lr_decay_epochs = 1.0
  config.lr_staircase = True
  config.weight_decay = 4e-5
  config.weight_decay_type = 'l2'
  # Paths ('block1_depthwise/conv/kernel') that get no weight decay: depthwise kernels (MobileNet
  # V1, section 3.2), BatchNorm parameters and biases.
  config.weight_decay_exclude = r'.*depthwise.*|.*/bias|.*/scale'
  config.label_smoothing = 0.0
  config.grad_clip_norm = 0.0  # > 0: clip the global gradient norm
  config.ema_decay = 0.0  # > 0: keep and evaluate an exponential moving average of the weights

  # Pretrained weights (convert.py writes them as a workdir): `eval_only` evaluates the latest
  # checkpoint of --workdir; `init_from` starts training from the latest checkpoint of another
  # workdir, with a new classifier when num_classes differs.
  config.eval_only = False
  config.init_from = ''

  # Knowledge distillation (Hinton et al. 2015; distillation.py): the student learns the soft
  # targets of a trained network of ours, its `teacher` workdir ('' for none).
  config.distill = ml_collections.ConfigDict()
  config.distill.teacher = ''
  config.distill.teacher_ema = False  # the teacher's moving averages instead of its raw weights
  config.distill.temperature = 4.0  # T: both softmaxes of the soft-target term at logits / T
  config.distill.weight = 0.9  # loss = (1 - weight) * label loss + weight * T^2 * soft loss
  # The teacher's input: the student's augmented crop at this size (0: the teacher's image_size).
  config.distill.teacher_image_size = 0
  # Set by main.py from the teacher's checkpoint (a resumed run refuses another teacher).
  config.distill.teacher_checksum = ''

  # Logging (in steps), evaluation and checkpoints (in epochs; the *_steps fields, when > 0,
  # override them). Every run also evaluates and checkpoints its last step.
  config.log_every_steps = 50
  # TensorBoard event files in the workdir, written by TensorFlow's own file system (local or
  # gs://); metrics.jsonl holds the same values either way.
  config.tensorboard = True
  config.eval_every_epochs = 1.0
  config.eval_every_steps = -1
  config.checkpoint_every_epochs = 1.0
  config.checkpoint_every_steps = -1
  config.keep_checkpoints = 3
  config.seed = 0
  return config
