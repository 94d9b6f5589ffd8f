r"""Input pipelines: TFDS + tf.data, deterministic by step, sharded over processes and devices.

Sources (`config.dataset`):
- any prepared TFDS image-classification data set, by name and optional version
  ('imagenet2012', 'cifar10:3.0.2'), read from `config.data_dir`;
- 'fashion_mnist' is prepared from the original IDX files when Debian's `dataset-fashion-mnist`
  package has put them in `config.fashion_mnist_files` (no download);
- 'folder:/path' for a folder with one sub-folder of images per class; a fixed fraction
  (`folder_eval_fraction`) of each class, chosen by file name, is held out for evaluation;
- 'synthetic', a generated stand-in for tests and benchmarks.

Data held in memory (`cache`, 'synthetic') is ordered globally: every process holds the whole
training split, epoch e permutes it by (seed, e), and each process takes its slice of every global
batch, so that N processes train on exactly the batches of one and a run may resume on another
number of processes. Streamed data (TFDS without `cache`, 'folder:') stays encoded until its
training crop is decoded (JPEGs: only the crop window), and is read in per-process parts
(`tfds.split_for_jax_process`), each shuffled by its own buffer, as the Flax ImageNet example does:
the same distribution on any number of processes, not the same order. Either way every random
augmentation is drawn for (seed, e, example), so the batch of any step can be rebuilt:
`train_batches` resumes a run exactly from any step. Evaluation reads each process's part of the
split once, padded to full batches with a `mask` that is 0 on padding, the same number of batches
on every process. Training batches carry uint8 pixels, which the train step normalizes on the
devices; evaluation batches carry normalized float32 images.

    python input_pipeline.py --config=configs/quickstart.py --throughput   # host images/s
"""

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import math
import os
import re
import time
from typing import Iterator, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import cli

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
# The first bytes of the files tf.io.decode_image reads: JPEG, PNG, GIF and BMP.
IMAGE_SIGNATURES = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'GIF87a', b'GIF89a', b'BM')
AUGMENTATIONS = ('inception_crop', 'pad_crop')
TRAIN_RESIZE_METHODS = ('bilinear', 'bicubic')


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (the MNIST format), gzip-compressed or not."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if data[:2] != b'\x00\x00' or data[2] != 0x08:
    raise ValueError(f'{path} is not an IDX file of unsigned bytes.')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMnistFromFiles(tfds.image_classification.FashionMNIST, skip_registration=True):
  """TFDS's `fashion_mnist` (same name, version and features), built from local IDX files."""
  name = 'fashion_mnist'

  def __init__(self, *, files_dir: str, **kwargs):
    self._files_dir = files_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(prefix) for split, prefix in
            (('train', 'train'), ('test', 't10k'))}

  def _generate_examples(self, prefix):  # pytype: disable=signature-mismatch
    images = read_idx(os.path.join(self._files_dir, f'{prefix}-images-idx3-ubyte.gz'))
    labels = read_idx(os.path.join(self._files_dir, f'{prefix}-labels-idx1-ubyte.gz'))
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': image[..., None], 'label': int(label)}


def prepare_quietly(builder: tfds.core.DatasetBuilder, **kwargs) -> None:
  """`builder.download_and_prepare(**kwargs)` with one line of ours instead of TFDS's nested
  progress bars and notes."""
  logging.info('Preparing %s in %s (once; later runs read it from there)...', builder.name,
               builder.data_dir)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(**kwargs)
  finally:
    tfds.display_progress_bar(True)


def prepare_fashion_mnist(files_dir: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  prepare_quietly(FashionMnistFromFiles(files_dir=files_dir, data_dir=data_dir),
                  download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return tfds.builder('fashion_mnist', data_dir=data_dir)


@dataclasses.dataclass
class Data:
  """The 'train' and 'eval' splits of a data set, examples {'image': uint8 HxWxC or encoded
  bytes, 'label': int}: this process's part of each, streamed by tf.data (`streams`), or every
  process's, held in memory as arrays (`in_memory`)."""
  name: str
  num_train: int  # whole split, all processes
  num_eval: int
  streams: Optional[dict[str, tf.data.Dataset]] = None
  stream_sizes: Optional[dict[str, int]] = None
  in_memory: Optional[dict[str, dict[str, np.ndarray]]] = None

  def examples(self, split: str) -> tf.data.Dataset:
    """This process's part of `split`."""
    if self.in_memory:
      return tf.data.Dataset.from_tensor_slices(self._local_arrays(split))
    return self.streams[split]

  def _local_arrays(self, split: str) -> dict[str, np.ndarray]:
    arrays = self.in_memory[split]
    part = _process_slice(len(arrays['label']))
    return {k: v[part] for k, v in arrays.items()}

  def arrays(self, split: str) -> Optional[dict[str, np.ndarray]]:
    """The whole of `split` (all processes') where it is held in memory, else None."""
    return self.in_memory[split] if self.in_memory else None

  def local_count(self, split: str) -> int:
    """The number of examples in this process's part of `split`."""
    if self.in_memory:
      return len(self._local_arrays(split)['label'])
    return self.stream_sizes[split]


def _process_slice(n: int) -> slice:
  """This process's part of n examples split as evenly as possible over the processes."""
  bounds = np.linspace(0, n, jax.process_count() + 1).astype(int)
  return slice(bounds[jax.process_index()], bounds[jax.process_index() + 1])


def _synthetic(config) -> Data:
  """Each class is a fixed random pattern of 4x4 blocks (so that it survives small shifts);
  examples add noise to it."""
  rng = np.random.default_rng(config.seed)
  size = config.image_size
  blocks = rng.uniform(0, 255, (config.num_classes, 4, 4, 3))
  prototypes = np.repeat(np.repeat(blocks, -(-size // 4), axis=1), -(-size // 4), axis=2)
  prototypes = prototypes[:, :size, :size]
  def split(n):
    labels = rng.integers(0, config.num_classes, n)
    images = prototypes[labels] + rng.normal(0, 40, (n, size, size, 3))
    return {'image': np.clip(images, 0, 255).astype(np.uint8), 'label': labels.astype(np.int64)}
  splits = {'train': split(config.synthetic_train_examples),
            'eval': split(config.synthetic_eval_examples)}
  return Data('synthetic', len(splits['train']['label']), len(splits['eval']['label']),
              in_memory=splits)


def check_image_file(path: str) -> None:
  """ValueError naming `path` unless it can be read and starts like a JPEG, PNG, GIF or BMP."""
  try:
    with open(path, 'rb') as f:
      head = f.read(8)
  except OSError as e:
    raise ValueError(f'Cannot read {path} ({e.strerror}).') from None
  if not head.startswith(IMAGE_SIGNATURES):
    raise ValueError(f'{path} is not a JPEG, PNG, GIF or BMP image: remove it or replace it.')


def _folder(config, root: str) -> Data:
  if not os.path.isdir(root):
    raise ValueError(f'Image folder {root!r} (from dataset={config.dataset!r}) does not exist.')
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise ValueError(f'Image folder {root!r} has no class sub-folders: put the images of each '
                     'class in a sub-folder named after it.')
  splits = {'train': ([], []), 'eval': ([], [])}
  for label, name in enumerate(classes):
    for file in sorted(os.listdir(os.path.join(root, name))):
      if file.lower().endswith(IMAGE_EXTENSIONS):
        path = os.path.join(root, name, file)
        check_image_file(path)
        digest = int(hashlib.sha256(f'{name}/{file}'.encode()).hexdigest()[:8], 16)
        split = 'eval' if digest / 16**8 < config.folder_eval_fraction else 'train'
        splits[split][0].append(path)
        splits[split][1].append(label)
  if config.num_classes != len(classes):
    raise ValueError(f'num_classes={config.num_classes}, but {root!r} has {len(classes)} class '
                     f'folders: set --config.num_classes={len(classes)}.')
  streams, sizes = {}, {}
  for split, (paths, labels) in splits.items():
    part = _process_slice(len(paths))
    files = tf.data.Dataset.from_tensor_slices((tf.constant(paths[part], tf.string),
                                                tf.constant(labels[part], tf.int32)))
    streams[split] = files.map(lambda path, label: {'image': tf.io.read_file(path),
                                                    'label': label})
    sizes[split] = len(labels[part])
  return Data(root, len(splits['train'][1]), len(splits['eval'][1]), streams, sizes)


def _missing(config, builder) -> ValueError:
  root = config.data_dir or '~/tensorflow_datasets'
  how = ('download the ILSVRC2012 train and validation tars into '
         f'{os.path.join(root, "downloads", "manual")} and run `tfds build imagenet2012 '
         f'--data_dir={root}`'
         if builder.name == 'imagenet2012' else
         f'run `tfds build {config.dataset} --data_dir=...` on a machine with internet access (or '
         'set config.download=True there) and point config.data_dir at that directory')
  hint = (' Offline, `apt-get install dataset-fashion-mnist` provides the original files.'
          if builder.name == 'fashion_mnist' else '')
  return ValueError(f'Dataset {config.dataset!r} is not prepared in {builder.data_dir}: '
                    f'{how}.{hint}')


def _resize_once(images: np.ndarray, config) -> np.ndarray:
  """For 'pad_crop', brings cached images to image_size x image_size RGB once, not every epoch."""
  size = config.image_size
  if config.augment != 'pad_crop' or images.shape[1:] == (size, size, 3):
    return images
  resized = []
  for start in range(0, len(images), 4096):
    chunk = tf.constant(images[start:start + 4096])
    if chunk.shape[1:3] != (size, size):
      shrink = chunk.shape[1] > size or chunk.shape[2] > size
      chunk = _as_uint8(_resize(chunk, (size, size), antialias=shrink))
    resized.append(_decode(chunk).numpy())  # grayscale to RGB after resizing: a third of the work
  return np.concatenate(resized)


def _tfds(config) -> Data:
  """A prepared TFDS data set; with `config.cache`, both splits decoded into memory (and, for
  'pad_crop', resized to image_size) once."""
  data_dir = config.data_dir or None
  if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ValueError(f'data_dir={data_dir} is a file: give the TFDS data directory.')
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except Exception as e:  # tfds raises several error types for unknown names
    raise ValueError(f'Unknown dataset {config.dataset!r}: {e}') from e
  if not builder.is_prepared():
    files = config.fashion_mnist_files
    if builder.name == 'fashion_mnist' and os.path.exists(
        os.path.join(files, 'train-images-idx3-ubyte.gz')):
      builder = prepare_fashion_mnist(files, data_dir)
    elif config.download:
      try:
        prepare_quietly(builder)
      except Exception as e:  # pylint: disable=broad-except  # network, disk, TFDS errors
        raise ValueError(f'TFDS could not download and prepare {config.dataset!r} in '
                         f'{builder.data_dir} ({type(e).__name__}: {e}).') from e
    else:
      raise _missing(config, builder)
  splits = {'train': config.train_split, 'eval': config.eval_split}
  for split in splits.values():
    if builder.info.splits and split not in builder.info.splits:
      raise ValueError(f'Dataset {config.dataset!r} has no split {split!r}; it has '
                       f'{", ".join(builder.info.splits)}.')
  def size(split):
    if builder.info.splits:
      return builder.info.splits[split].num_examples
    # No recorded split sizes (a data set without metadata): count the examples.
    return int(builder.as_dataset(split=split).reduce(0, lambda count, _: count + 1))
  # Only the image and the label are parsed. Streams keep images encoded (a shuffle buffer of
  # JPEG bytes, 1/5 of a decoded image's memory or less, and skipped examples never decoded);
  # preprocessing decodes them.
  encoded = isinstance(builder.info.features['image'], tfds.features.Image)
  def read(split, decode):
    skip = {'image': tfds.decode.SkipDecoding()} if encoded and not decode else None
    decoders = tfds.decode.PartialDecoding({'image': True, 'label': True}, decoders=skip)
    return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                              read_config=tfds.ReadConfig(skip_prefetch=True))
  local = {k: tfds.split_for_jax_process(v, drop_remainder=False) for k, v in splits.items()}
  data = Data(config.dataset, size(splits['train']), size(splits['eval']),
              streams={k: read(v, decode=False) for k, v in local.items()},
              stream_sizes={k: size(v) for k, v in local.items()})
  if config.cache:
    # Every process holds the whole of both splits (see the module's docstring), read as one
    # batch: `as_dataset(batch_size=-1)` relies on the recorded split sizes, which data sets
    # without metadata (and tfds.testing.mock_data) do not have.
    whole = {'train': data.num_train, 'eval': data.num_eval}
    arrays = {k: tfds.as_numpy(read(v, decode=True).batch(whole[k]).get_single_element())
              for k, v in splits.items()}
    data.in_memory = {k: {'image': _resize_once(v['image'], config), 'label': v['label']}
                      for k, v in arrays.items()}
  return data


def load(config) -> Data:
  """The data set named by `config.dataset`; ValueError if it is unknown or not available."""
  if config.dataset == 'synthetic':
    return _synthetic(config)
  if config.dataset.startswith('folder:'):
    return _folder(config, config.dataset[len('folder:'):])
  return _tfds(config)


def check_config(config) -> None:
  """ValueError for the first bad setting of the batches: sizes that do not divide over the
  devices, an unknown augmentation or resize."""
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] <= 0 or config[field] % devices:
      raise ValueError(f'{field}={config[field]} must be a positive multiple of the '
                       f'{devices} devices.')
  if config.augment not in AUGMENTATIONS:
    raise ValueError(f'Unknown augment {config.augment!r}; valid: {", ".join(AUGMENTATIONS)}.')
  if config.train_resize_method not in TRAIN_RESIZE_METHODS:
    raise ValueError(f'Unknown train_resize_method {config.train_resize_method!r}; valid: '
                     f'{", ".join(TRAIN_RESIZE_METHODS)}.')


def check_train_size(data: Data, config) -> None:
  """ValueError unless every process has a global batch of training examples (anything less
  would give epochs without a step)."""
  local_batch = config.batch_size // jax.process_count()
  local = data.local_count('train')
  if local < local_batch:
    raise ValueError(
        f'{data.name} has {data.num_train} training examples ({local} for this process), fewer '
        f'than one batch of batch_size={config.batch_size} ({local_batch} per process): lower '
        'batch_size or use more data.')


def check_eval_size(data: Data, config) -> None:
  """ValueError if there is nothing to evaluate."""
  if data.num_eval == 0:
    raise ValueError(f'{data.name} has no evaluation examples in eval_split={config.eval_split!r}'
                     ' (folder: data sets, folder_eval_fraction): give it some.')


def steps_per_epoch(data: Data, global_batch_size: int) -> int:
  return max(data.num_train // global_batch_size, 1)


# Preprocessing -------------------------------------------------------------------------------


def _decode(image) -> tf.Tensor:
  """uint8 [N]xHxWx3 from an encoded image or a uint8 [N]xHxWxC tensor (grayscale becomes RGB)."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return image


def normalize(pixels, config):
  """The network's input, (pixels - mean) / std, from float32 pixels 0..255: a tf.Tensor
  (evaluation, inference) or a jax.Array (training batches, normalized by the train step on the
  devices)."""
  mean = np.asarray(config.normalization_mean, np.float32)
  std = np.asarray(config.normalization_std, np.float32)
  return (pixels - mean) / std


def _resize(image, size, method: str = 'bicubic', antialias: bool = True) -> tf.Tensor:
  """Resize (bicubic by default), clipped to the pixel range bicubic overshoots. Antialiasing
  matters only when shrinking; enlarging without it is three times faster and differs by < 0.2 of
  a grey level."""
  image = tf.image.resize(image, size, method=method, antialias=antialias)
  return tf.clip_by_value(image, 0.0, 255.0)


def _as_uint8(image) -> tf.Tensor:
  """Pixels rounded to uint8 (the resize's float output is within 0..255)."""
  return image if image.dtype == tf.uint8 else tf.cast(tf.round(image), tf.uint8)


def _inception_crop(image, seed, config) -> tf.Tensor:
  """A random window of `image` (encoded or uint8 HxWxC) with area in [crop_area_min, 1] and
  aspect ratio in [3/4, 4/3] (Szegedy et al. 2015, as TF-slim's inception_preprocessing), uint8
  RGB. A JPEG decodes only that window (`decode_and_crop_jpeg`); other formats decode whole."""
  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(config.crop_area_min, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin, size
  def crop_decoded(decoded):
    return _decode(tf.slice(decoded, *window(tf.shape(decoded))))
  if image.dtype != tf.string:
    return crop_decoded(image)
  def crop_jpeg():
    begin, size = window(tf.image.extract_jpeg_shape(image))
    return tf.image.decode_and_crop_jpeg(image, tf.concat([begin[:2], size[:2]], 0), channels=3)
  return tf.cond(tf.io.is_jpeg(image), crop_jpeg, lambda: crop_decoded(_decode(image)))


def preprocess_train(example, seed, draws, config):
  """The per-example part of training preprocessing, uint8 pixels: 'inception_crop': a random
  resized crop (seeded by `seed`; resized by `train_resize_method` and `train_resize_antialias`),
  flipped horizontally where draws[2] < 0.5, and the same crop at the distillation teacher's
  size where it differs ('teacher_image'); 'pad_crop': a decode and resize to image_size
  (`pad_crop_and_flip` does the rest a batch at a time)."""
  size = config.image_size
  if config.augment == 'inception_crop':
    crop = _inception_crop(example['image'], seed, config)
    def view(side):
      image = _as_uint8(_resize(crop, (side, side), method=config.train_resize_method,
                                antialias=config.train_resize_antialias))
      return tf.cond(draws[2] < 0.5, lambda: tf.reverse(image, [1]), lambda: image)
    views = {'image': view(size)}
    teacher_size = teacher_image_size(config)
    if teacher_size:
      views['teacher_image'] = view(teacher_size)
    return {**views, 'label': example['label']}
  image = _decode(example['image'])
  if image.shape[0] != size or image.shape[1] != size:
    image = _as_uint8(_resize(image, (size, size)))
  return {'image': image, 'label': example['label']}


def teacher_image_size(config) -> int:
  """The size of the distillation teacher's view of each training crop ('teacher_image' in the
  training batches), or 0 where the batches have none: no teacher, or one at image_size."""
  size = config.distill.teacher_image_size if config.distill.teacher else 0
  return 0 if size == config.image_size else size


def pad_crop_and_flip(batch, draws, config):
  """'pad_crop' a batch at a time: image_size uint8 images padded by crop_padding, cropped at
  random and flipped horizontally, each example by its own uniform draws (row offset, column
  offset, flip where < 0.5); with a distillation teacher of another size, the crops resized to
  its size too ('teacher_image')."""
  images = batch['image']
  size, pad = config.image_size, config.crop_padding
  # One gather crops the columns and flips: a flipped image reads its columns backwards.
  offsets = tf.cast(draws[:, :2] * (2 * pad + 1), tf.int32)  # 0 .. 2 * pad
  columns = tf.where((draws[:, 2] < 0.5)[:, None], tf.range(size)[::-1], tf.range(size))
  if pad:
    images = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    images = tf.gather(images, offsets[:, :1] + tf.range(size), axis=1, batch_dims=1)
  images = tf.gather(images, columns + offsets[:, 1:], axis=2, batch_dims=1)
  views = {'image': images}
  teacher_size = teacher_image_size(config)
  if teacher_size:
    views['teacher_image'] = _as_uint8(_resize(images, (teacher_size, teacher_size),
                                               antialias=teacher_size < size))
  return {**views, 'label': batch['label']}


def preprocess_eval(example, config):
  """Resize to image_size / crop_fraction and center-crop (small images: resize only)."""
  image = _decode(example['image'])
  size = config.image_size
  if config.augment == 'inception_crop':
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / config.eval_crop_fraction / tf.reduce_min(shape)
    resized = tf.cast(tf.round(shape * scale), tf.int32)
    image = _resize(image, resized)
    offset = (resized - size) // 2
    image = tf.slice(image, [offset[0], offset[1], 0], [size, size, 3])
  elif image.shape[0] != size or image.shape[1] != size:
    image = _resize(image, (size, size))
  return {'image': normalize(tf.cast(image, tf.float32), config), 'label': example['label'],
          'mask': 1.0}


def shard(batch: dict) -> dict:
  """Reshapes (local_batch, ...) arrays to (local_devices, local_batch / local_devices, ...)."""
  devices = jax.local_device_count()
  return jax.tree.map(lambda x: x.reshape(devices, x.shape[0] // devices, *x.shape[1:]), batch)


def _options(config) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = config.data_threads or 0
  options.threading.max_intra_op_parallelism = 1
  return options


def _sharded_batches(ds: tf.data.Dataset, data: Data) -> Iterator[dict]:
  """`ds`'s batches, sharded over the local devices; ValueError for an image that does not
  decode (a file with an image's first bytes and broken contents)."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      message = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', e.message.splitlines()[0])
      raise ValueError(f'An image of {data.name} does not decode ({message}): find and replace '
                       'the broken file.') from None
    yield shard(batch)  # outside the try: closing the generator raises GeneratorExit here


def train_batches(data: Data, config, per_epoch: int, start_step: int = 0,
                  end_step: Optional[int] = None) -> Iterator[dict]:
  """This process's part of the global training batch of steps start_step + 1 to `end_step`
  (None: without end), with `per_epoch` steps (`steps_per_epoch`) an epoch: one tf.data iterator
  over all epochs, epoch e ordered and augmented by (seed, e). With an end, the pipeline has
  nothing left in flight after the last batch, so closing it is immediate (an endless one that
  is closed waits for the work under way, seconds on a busy host)."""
  local_batch = config.batch_size // jax.process_count()
  first_epoch, offset = divmod(start_step, per_epoch)
  # Data in memory that fits the shuffle buffer is permuted whole, by index, and each process
  # takes its slice of every global batch; it needs no buffer filled each epoch and (for
  # 'pad_crop', whose images are already image_size) no per-example work at all.
  arrays = data.arrays('train')
  if arrays is not None and config.shuffle_buffer < data.num_train:
    arrays = None
  count = data.num_train if arrays is not None else data.local_count('train')
  buffer = min(config.shuffle_buffer, count)
  per_example = arrays is None or config.augment == 'inception_crop'
  if arrays is not None:
    tensors = {k: tf.convert_to_tensor(v) for k, v in arrays.items()}
    this_process = slice(jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch)
  else:
    examples = data.examples('train').enumerate()

  def epoch_batches(epoch):
    seed = tf.stack([tf.constant(config.seed, tf.int64), epoch])
    skip = tf.cast(epoch == first_epoch, tf.int64) * offset  # resume inside the first epoch
    draws = tf.random.stateless_uniform([count, 3], seed)  # one row per example of this epoch
    if arrays is not None:
      order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed)
      ds = tf.data.Dataset.from_tensor_slices(order).batch(config.batch_size, drop_remainder=True)
      ds = ds.take(per_epoch).skip(skip).map(
          lambda i: (i[this_process], {k: tf.gather(t, i[this_process])
                                       for k, t in tensors.items()}))
      if per_example:
        ds = ds.unbatch()
    else:
      ds = examples.shuffle(buffer, seed=config.seed * 100_003 + epoch,
                            reshuffle_each_iteration=False)
      ds = ds.take(per_epoch * local_batch).skip(skip * local_batch)
    if per_example:
      ds = ds.map(lambda i, e: (i, preprocess_train(
          e, tf.random.experimental.stateless_fold_in(seed, i), draws[i], config)),
                  num_parallel_calls=tf.data.AUTOTUNE)
      ds = ds.batch(local_batch, drop_remainder=True)
    if config.augment == 'pad_crop':
      return ds.map(lambda i, batch: pad_crop_and_flip(batch, tf.gather(draws, i), config))
    return ds.map(lambda i, batch: batch)

  end_epoch = 2**62 if end_step is None else -(-end_step // per_epoch)
  ds = tf.data.Dataset.range(first_epoch, end_epoch).flat_map(epoch_batches)
  if end_step is not None:
    ds = ds.take(end_step - start_step)
  ds = ds.prefetch(config.prefetch_batches).with_options(_options(config))
  yield from _sharded_batches(ds, data)


def eval_batches(data: Data, config) -> Iterator[dict]:
  """The whole eval split once; `mask` is 0 on the padding of the last batches."""
  local_batch = config.eval_batch_size // jax.process_count()
  # The same number of batches on every process, enough for the largest part.
  num_batches = math.ceil(math.ceil(data.num_eval / jax.process_count()) / local_batch)
  ds = data.examples('eval').map(functools.partial(preprocess_eval, config=config),
                                 num_parallel_calls=tf.data.AUTOTUNE)
  blank = jax.tree.map(lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat())
  ds = ds.batch(local_batch).take(num_batches).prefetch(config.prefetch_batches)
  yield from _sharded_batches(ds.with_options(_options(config)), data)


def host_cores(config) -> int:
  """The cores tf.data may use: this process's CPUs, or `data_threads` where that is fewer."""
  cores = len(os.sched_getaffinity(0))
  return min(cores, config.data_threads) if config.data_threads else cores


def measure_throughput(config, steps: int) -> float:
  """Host images/s of the training pipeline over `steps` batches after a warm-up batch."""
  data = load(config)
  batches = train_batches(data, config, steps_per_epoch(data, config.batch_size),
                          end_step=steps + 1)
  next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * config.batch_size / (time.perf_counter() - start)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS.throughput:
    raise app.UsageError('Nothing to do: pass --throughput.')
  config = flags.FLAGS.config
  rate = measure_throughput(config, flags.FLAGS.steps)
  cores = host_cores(config)
  print(f'{config.dataset}: {rate:.0f} training images/s on this host, {rate / cores:.0f} per '
        f'core ({cores} cores, {config.image_size} px, batch {config.batch_size})')


if __name__ == '__main__':
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_bool('throughput', False, 'Measure the training pipeline in images/s.')
  flags.DEFINE_integer('steps', 50, 'Batches to time with --throughput.')
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=cli.parse_flags)
