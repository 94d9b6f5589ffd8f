"""Defaults shared by every config, and the parser for the short argument strings.

A config file's `get_config(arg)` receives what follows the colon in
`--config=configs/mobilenet_v2.py:alpha=0.5,res=160`; `parse_arg` turns it into typed values.
"""

import ml_collections


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

  config.dataset = 'imagenet2012'
  config.num_classes = 1000
  # The resolution multiplier rho: image_size = 224 * rho.
  config.image_size = 224
  # bfloat16 compute with float32 parameters.
  config.half_precision = False
  return config
