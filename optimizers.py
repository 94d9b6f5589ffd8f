"""Optimizers, learning-rate schedules and the weight-decay mask, built from the config.

Optimizers (`config.optimizer`):
- 'sgd': SGD with momentum (`config.momentum`, `config.nesterov`).
- 'rmsprop': RMSProp in the TensorFlow form the MobileNet papers trained with: decay 0.9,
  momentum 0.9, epsilon 1.0 inside the square root, second-moment accumulator initialised to 1.
- 'adamw': Adam with decoupled weight decay.

Weight decay (`config.weight_decay_type`): 'l2' adds `weight_decay * w` to the gradient (TF's L2
regularizer `weight_decay * ||w||^2 / 2`); 'decoupled' adds it after the preconditioner, scaled by
the learning rate only. Parameters whose path matches `config.weight_decay_exclude` (by default
depthwise kernels, BatchNorm scales and all biases) get none.

Schedules (`config.schedule`), after `config.warmup_epochs` of linear warm-up from 0:
'exponential' (x `lr_decay_rate` every `lr_decay_epochs`, `lr_staircase` for steps), 'cosine',
'linear' (to zero at the end), 'constant'.
"""

import re

import flax
import ml_collections
import optax

OPTIMIZERS = ('sgd', 'rmsprop', 'adamw')
SCHEDULES = ('exponential', 'cosine', 'linear', 'constant')
WEIGHT_DECAY_TYPES = ('l2', 'decoupled')


def check_config(config: ml_collections.ConfigDict):
  """Raises ValueError naming the first optimisation setting that is invalid."""
  def one_of(field, valid):
    if config[field] not in valid:
      raise ValueError(f'Unknown {field} {config[field]!r}; valid: {", ".join(valid)}.')
  one_of('optimizer', OPTIMIZERS)
  one_of('schedule', SCHEDULES)
  one_of('weight_decay_type', WEIGHT_DECAY_TYPES)
  if not config.learning_rate > 0:
    raise ValueError(f'learning_rate must be > 0, got {config.learning_rate}.')
  if config.weight_decay < 0:
    raise ValueError(f'weight_decay must be >= 0, got {config.weight_decay}.')
  if config.schedule == 'exponential' and not (config.lr_decay_rate > 0 and
                                               config.lr_decay_epochs > 0):
    raise ValueError('lr_decay_rate and lr_decay_epochs must be > 0 for the exponential schedule.')
  try:
    re.compile(config.weight_decay_exclude)
  except re.error as e:
    raise ValueError(f'weight_decay_exclude is not a valid regular expression: {e}.') from e


def base_learning_rate(config, global_batch_size: int) -> float:
  """`learning_rate`, scaled by global_batch / `lr_reference_batch_size` when that is > 0."""
  if config.lr_reference_batch_size > 0:
    return config.learning_rate * global_batch_size / config.lr_reference_batch_size
  return config.learning_rate


def create_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  lr = base_learning_rate(config, config.batch_size)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == 'exponential':
    main = optax.exponential_decay(
        lr, transition_steps=max(int(config.lr_decay_epochs * steps_per_epoch), 1),
        decay_rate=config.lr_decay_rate, staircase=config.lr_staircase)
  elif config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, decay_steps)
  elif config.schedule == 'linear':
    main = optax.linear_schedule(lr, 0.0, decay_steps)
  else:
    main = optax.constant_schedule(lr)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def weight_decay_mask(params, exclude: str):
  """True for every parameter that gets weight decay: those whose 'a/b/kernel' path does not
  match the `exclude` regular expression."""
  pattern = re.compile(exclude)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return flax.traverse_util.unflatten_dict(
      {path: pattern.fullmatch(path) is None for path in flat}, sep='/')


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  decay = optax.add_decayed_weights(
      config.weight_decay, mask=lambda p: weight_decay_mask(p, config.weight_decay_exclude))
  if config.optimizer == 'sgd':
    precondition, momentum = optax.identity(), optax.trace(config.momentum, config.nesterov)
  elif config.optimizer == 'rmsprop':
    precondition = optax.scale_by_rms(config.rmsprop_decay, config.rmsprop_epsilon,
                                      initial_scale=1.0, eps_in_sqrt=True)
    momentum = optax.identity()
  else:
    precondition = optax.scale_by_adam(config.adam_b1, config.adam_b2, config.adam_epsilon)
    momentum = optax.identity()
  # TF's RMSProp applies momentum to the learning-rate-scaled update: mom = m * mom + lr * g / rms.
  post_lr = (optax.trace(config.momentum, config.nesterov) if config.optimizer == 'rmsprop'
             else optax.identity())
  steps = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
  if config.weight_decay_type == 'l2':
    steps += [decay, momentum, precondition]
  else:
    steps += [momentum, precondition, decay]
  steps += [optax.scale_by_learning_rate(schedule), post_lr]
  return optax.chain(*steps)
