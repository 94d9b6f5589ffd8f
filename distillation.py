"""Knowledge distillation (Hinton et al. 2015): a student learns a trained teacher's soft targets.

The teacher is the latest checkpoint of a workdir of ours (a run of main.py, or published weights
written by convert.py), `config.distill.teacher`. Its network and input settings come from that
workdir's config.json; it may be any of our networks at its own resolution. It sees the student's
augmented crop resized to its image size (input_pipeline: 'teacher_image'), normalized as it was
trained, and runs frozen inside the student's pmapped train step: BatchNorm in inference mode, no
gradient, its weights placed on the devices once.

The loss of a distilled step (Hinton et al. 2015, section 2) is

    (1 - weight) * CE(labels, softmax(z_s)) + weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

where the T^2 keeps the soft term's gradients at the scale of the label term's as T changes
(the KL divergence differs from the paper's cross-entropy by the teacher's entropy, a constant).
"""

import dataclasses
import hashlib

from absl import logging
import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import default
import input_pipeline
import models
import workdirs

# What a teacher's config.json must give: its network and how it was fed.
TEACHER_SETTINGS = ('model', 'image_size', 'num_classes', 'label_offset', 'normalization_mean',
                    'normalization_std')


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A trained network whose logits a student learns, and how to feed it."""
  network: nn.Module
  config: ml_collections.ConfigDict  # its settings: image_size, normalization_mean/std
  class_shift: int  # its label_offset minus the student's: 1 for a 1001-class teacher of 1000

  def logits(self, variables: dict, pixels: jax.Array) -> jax.Array:
    """The teacher's logits (no gradient) for uint8 `pixels` at its image size, over the
    student's classes: a background class the teacher lacks gets logit -inf (probability 0)."""
    images = input_pipeline.normalize(pixels.astype(jnp.float32), self.config)
    logits = jax.lax.stop_gradient(self.network.apply(variables, images, train=False))
    if self.class_shift > 0:
      return logits[:, self.class_shift:]
    background = jnp.full((logits.shape[0], -self.class_shift), -jnp.inf, logits.dtype)
    return jnp.concatenate([background, logits], axis=-1)


def soft_target_loss(logits: jax.Array, teacher_logits: jax.Array,
                     temperature: float) -> jax.Array:
  """T^2 * KL(softmax(teacher_logits / T) || softmax(logits / T)) per example."""
  targets = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature)
  log_predictions = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
  return temperature**2 * optax.losses.kl_divergence(log_predictions, targets)


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError for a bad distillation setting (the teacher itself is checked by `load`)."""
  settings = config.distill
  if settings.temperature <= 0:
    raise ValueError(f'distill.temperature must be > 0, got {settings.temperature}.')
  if not 0.0 <= settings.weight <= 1.0:
    raise ValueError(f'distill.weight must be in [0, 1], got {settings.weight}.')
  if settings.teacher_image_size < 0:
    raise ValueError('distill.teacher_image_size must be > 0, or 0 for the teacher\'s own '
                     f'image_size; got {settings.teacher_image_size}.')


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The settings of the teacher in `config.distill.teacher` (from its config.json), with the
  student's compute settings (conv_impl, half_precision) and `distill.teacher_image_size`."""
  path = config.distill.teacher
  try:
    saved = workdirs.read_config(path, fields=TEACHER_SETTINGS)
  except ValueError as e:
    raise ValueError(f'distill.teacher: {e}') from None
  teacher = ml_collections.ConfigDict(config.to_dict())
  teacher.model = ml_collections.ConfigDict({**saved['model'],
                                             'conv_impl': config.model.conv_impl})
  for field in TEACHER_SETTINGS[1:]:
    default.set_field(teacher, field, saved[field])
  if config.distill.teacher_image_size:
    teacher.image_size = config.distill.teacher_image_size
  return teacher


def read_teacher(config: ml_collections.ConfigDict) -> Teacher:
  """The Teacher of `config.distill.teacher`; ValueError if it cannot teach this student (another
  class space, a network or image size this version cannot build)."""
  path = config.distill.teacher
  settings = teacher_config(config)
  try:
    network = models.get_model(settings)
  except ValueError as e:
    raise ValueError(f'distill.teacher={path} cannot be built: {e}') from None
  classes = settings.num_classes - settings.label_offset
  if classes != config.num_classes - config.label_offset:
    raise ValueError(
        f'distill.teacher={path} predicts {classes} classes (num_classes={settings.num_classes}, '
        f'label_offset={settings.label_offset}), this run {config.num_classes - config.label_offset}'
        f' (num_classes={config.num_classes}, label_offset={config.label_offset}): the teacher '
        'must know the same classes.')
  return Teacher(network, settings, settings.label_offset - config.label_offset)


def teacher_variables(config: ml_collections.ConfigDict, teacher: Teacher) -> dict:
  """{'params', 'batch_stats'} of the latest checkpoint of `config.distill.teacher` (its moving
  averages with `distill.teacher_ema`) as NumPy arrays; ValueError if they do not fit
  `teacher.network`."""
  path = config.distill.teacher
  variables = workdirs.checkpoint_weights(path, ema=config.distill.teacher_ema)
  if variables is None:
    raise ValueError(f'distill.teacher={path} kept no moving averages: set '
                     'distill.teacher_ema=False.')
  differing = workdirs.differing_shapes(variables, models.variable_shapes(teacher.config))
  if differing:
    raise ValueError(f'The checkpoint in distill.teacher={path} does not fit the network of its '
                     f'config.json: {", ".join(differing[:3])} differ. Use a workdir of main.py '
                     'or convert.py, unchanged.')
  return variables


def checksum(variables: dict) -> str:
  """A SHA-256 (16 hex digits) of the names, shapes and values of `variables`: the identity of a
  teacher, which a resumed run checks."""
  digest = hashlib.sha256()
  for name, value in sorted(flax.traverse_util.flatten_dict(variables, sep='/').items()):
    value = np.ascontiguousarray(value)
    digest.update(f'{name}:{value.dtype}:{value.shape};'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:16]


def load(config: ml_collections.ConfigDict):
  """(config with the teacher's image size and checksum recorded, the Teacher, its variables)
  for a run with `config.distill.teacher`; (config, None, None) without one. ValueError for a
  teacher that cannot teach this run, before anything is compiled."""
  if not config.distill.teacher:
    return config, None, None
  teacher = read_teacher(config)
  variables = teacher_variables(config, teacher)
  config = ml_collections.ConfigDict(config.to_dict())
  config.distill.teacher_image_size = teacher.config.image_size
  config.distill.teacher_checksum = checksum(variables)
  logging.info('Distilling from %s: %s %g at %d px (checksum %s), T = %g, weight %g.',
               config.distill.teacher, teacher.config.model.name, teacher.config.model.alpha,
               teacher.config.image_size, config.distill.teacher_checksum,
               config.distill.temperature, config.distill.weight)
  return config, teacher, variables
