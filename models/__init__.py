"""The model registry: `get_model(config)` builds the network named by `config.model.name`."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

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


def random_variables(model, res: int, seed: int = 0, random_batchnorm: bool = False) -> dict:
  """Variables of `model` with He-normal kernels drawn with NumPy, and fresh BatchNorm state
  (scale and variance 1, bias and mean 0) or, with `random_batchnorm`, random BatchNorm
  parameters and statistics; biases 0 (random with `random_batchnorm`). Untrained weights for
  timing an exported network, and for tests.

  `model.init` compiles one random-number kernel per parameter, which takes 10-20 s per variant on
  a 2-core CPU; a forward pass is the same whichever way the values were drawn.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32))
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_out = np.prod(leaf.shape) // leaf.shape[-2]
      return rng.normal(0, np.sqrt(2 / fan_out), leaf.shape).astype(np.float32)
    if random_batchnorm:
      if name in ('scale', 'var'):
        return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
      return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ('scale', 'var') else 0.0, np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)
