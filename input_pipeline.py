"""Input data for training and evaluation.

Data sets that fit in host memory (Fashion-MNIST, CIFAR-10, `synthetic`) are loaded once with TFDS,
resized to `config.image_size` and normalised; batches are then cut by index, so the batch of any
step is a pure function of (seed, step): the training loop can resume at any step exactly.

- Train: the examples of epoch e are visited in the order `permutation(seed, e)`; each process takes
  its slice of every global batch; images get a random horizontal flip and, when
  `config.crop_padding > 0`, a random crop from the zero-padded image (the small-image recipe).
- Eval: the whole split in order, padded to a multiple of the global batch, with a `mask` that is 1
  for real examples and 0 for padding, so every example counts exactly once.
"""

import dataclasses
from typing import Iterator

import jax
import numpy as np

SYNTHETIC = 'synthetic'


@dataclasses.dataclass(frozen=True)
class InMemoryData:
  train_images: np.ndarray  # float32 NHWC, normalised
  train_labels: np.ndarray  # int32
  eval_images: np.ndarray
  eval_labels: np.ndarray
  num_classes: int

  @property
  def num_train(self) -> int:
    return len(self.train_labels)

  @property
  def num_eval(self) -> int:
    return len(self.eval_labels)


def _synthetic(config) -> tuple[np.ndarray, ...]:
  """A learnable stand-in data set: each class is a fixed random image plus noise."""
  rng = np.random.default_rng(config.seed)
  size = config.image_size
  prototypes = rng.uniform(0, 255, (config.num_classes, size, size, 3))
  def split(n):
    labels = rng.integers(0, config.num_classes, n)
    images = prototypes[labels] + rng.normal(0, 40, (n, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int32)
  return (*split(config.synthetic_train_examples), *split(config.synthetic_eval_examples))


def _tfds(config) -> tuple[np.ndarray, ...]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(config.dataset, data_dir=config.get('data_dir') or None)
  except Exception as e:  # tfds raises several types for unknown names
    raise ValueError(f'Unknown dataset {config.dataset!r}: {e}') from e
  if not builder.is_prepared():
    raise ValueError(
        f'Dataset {config.dataset!r} is not prepared in {builder.data_dir}. Prepare it with '
        f'`tfds build {config.dataset} --data_dir=...` (or run once with internet access) and set '
        f'config.data_dir to that directory.')
  def split(name):
    data = tfds.as_numpy(builder.as_dataset(split=name, batch_size=-1))
    return data['image'], data['label'].astype(np.int32)
  return (*split(config.train_split), *split(config.eval_split))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if images.shape[1:3] == (size, size):
    return images.astype(np.float32)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.image.resize(images, (size, size), antialias=True).numpy()


def load(config) -> InMemoryData:
  """Loads `config.dataset` into memory, resized and normalised."""
  if config.dataset == SYNTHETIC:
    arrays = _synthetic(config)
  else:
    arrays = _tfds(config)
  train_images, train_labels, eval_images, eval_labels = arrays
  mean = np.asarray(config.normalization_mean, np.float32)
  std = np.asarray(config.normalization_std, np.float32)
  def prepare(images):
    return (_resize(images, config.image_size) - mean) / std
  return InMemoryData(prepare(train_images), train_labels, prepare(eval_images), eval_labels,
                      config.num_classes)


def steps_per_epoch(data: InMemoryData, global_batch_size: int) -> int:
  return max(data.num_train // global_batch_size, 1)


def train_batch(data: InMemoryData, config, step: int) -> dict[str, np.ndarray]:
  """This process's part of the global training batch of `step`, shaped for the local devices."""
  batch = config.batch_size
  per_epoch = steps_per_epoch(data, batch)
  epoch, index = divmod(step, per_epoch)
  order = np.random.default_rng([config.seed, epoch]).permutation(data.num_train)
  local = batch // jax.process_count()
  start = index * batch + jax.process_index() * local
  indices = order[start:start + local]
  images = data.train_images[indices]
  rng = np.random.default_rng([config.seed, epoch, index, jax.process_index()])
  flip = rng.random(local) < 0.5
  images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  if config.crop_padding > 0:
    pad = config.crop_padding
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = rng.integers(0, 2 * pad + 1, (local, 2))
    size = images.shape[1]
    images = np.stack([p[y:y + size, x:x + size] for p, (y, x) in zip(padded, offsets)])
  return shard({'image': images, 'label': data.train_labels[indices]})


def eval_batches(data: InMemoryData, config) -> Iterator[dict[str, np.ndarray]]:
  """The whole eval split, this process's part of each padded global batch, with `mask`."""
  batch = config.eval_batch_size
  local = batch // jax.process_count()
  num_batches = -(-data.num_eval // batch)
  for b in range(num_batches):
    start = b * batch + jax.process_index() * local
    indices = np.arange(start, start + local)
    mask = indices < data.num_eval
    indices = np.where(mask, indices, 0)
    yield shard({'image': data.eval_images[indices], 'label': data.eval_labels[indices],
                 'mask': mask.astype(np.float32)})


def shard(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Reshapes (local_batch, ...) arrays to (local_devices, local_batch / local_devices, ...)."""
  devices = jax.local_device_count()
  return {k: v.reshape(devices, v.shape[0] // devices, *v.shape[1:]) for k, v in batch.items()}
