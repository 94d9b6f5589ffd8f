"""The model registry: `get_model(config)` builds the network named by `config.model.name`."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from models.mobilenet_v1 import MobileNetV1
from models.mobilenet_v2 import MobileNetV2
from models.shufflenet import ShuffleNet
from models.shufflenet_structures import STRUCTURES
from models.squeezenet import SqueezeNet
from models.xception import Xception

MODELS = {
    'mobilenet_v1': MobileNetV1,
    'mobilenet_v2': MobileNetV2,
    'shufflenet': ShuffleNet,
    'squeezenet': SqueezeNet,
    'xception': Xception,
    **STRUCTURES,
}


def get_model(config: ml_collections.ConfigDict, **overrides):
  """Builds the model for `config` and checks it against `config.image_size`.

  Every field of `config.model` except `name` is a constructor argument of the network;
  `num_classes` and the compute dtype (`half_precision` -> bfloat16) come from the top level.
  Raises ValueError naming the setting for an unknown model, an unknown field or a bad value.
  """
  name = config.model.name
  if name not in MODELS:
    raise ValueError(f'Unknown model.name {name!r}; valid names: {", ".join(sorted(MODELS))}.')
  cls = MODELS[name]
  kwargs = {k: v for k, v in config.model.items() if k != 'name'}
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f'model.{unknown[0]} is not a setting of {name}; its settings are: '
                     f'{", ".join(sorted(fields - {"num_classes", "dtype", "axis_name"}))}.')
  kwargs['num_classes'] = config.num_classes
  kwargs['dtype'] = jnp.bfloat16 if config.get('half_precision', False) else jnp.float32
  kwargs.update(overrides)
  model = cls(**kwargs)
  model.check_image_size(config.image_size)
  return model


def variable_shapes(config: ml_collections.ConfigDict) -> dict:
  """The shapes and dtypes of the variables of `config`'s network, without computing them."""
  model = get_model(config)
  image = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
