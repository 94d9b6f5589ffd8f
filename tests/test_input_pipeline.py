"""The input pipeline on mock TFDS data, local IDX files, image folders and simulated processes."""

import gzip
import io
import itertools
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import input_pipeline
from configs import cifar10, default, mobilenet_v2, quickstart
from tests.helpers import run_tool
from tools import make_imagenet_like

DEVICES = jax.local_device_count()


def _config(base, **overrides):
  for key, value in overrides.items():
    base[key] = value
  return base


def _train_batches(data, config, start_step=0):
  per_epoch = input_pipeline.steps_per_epoch(data, config.batch_size)
  return input_pipeline.train_batches(data, config, per_epoch, start_step)


def _eval_examples(data, config):
  """(labels of real examples, number of padding slots) over all eval batches."""
  labels, padding = [], 0
  for batch in input_pipeline.eval_batches(data, config):
    assert batch['image'].shape[:2] == (DEVICES, config.eval_batch_size // DEVICES)
    mask = batch['mask'].reshape(-1)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    labels += list(batch['label'].reshape(-1)[mask == 1])
    padding += int((mask == 0).sum())
  return labels, padding


@pytest.mark.parametrize('image_size', [64, 96, 128])
def test_imagenet_path_on_mock_data(image_size):
  config = _config(mobilenet_v2.get_config(f'res={image_size}'), batch_size=16,
                   eval_batch_size=16, download=True, shuffle_buffer=64)
  with tfds.testing.mock_data(num_examples=21):
    data = input_pipeline.load(config)
    batch = next(_train_batches(data, config))
    assert batch['image'].shape == (DEVICES, 16 // DEVICES, image_size, image_size, 3)
    assert batch['image'].dtype == np.uint8 and batch['label'].dtype == np.int64
    assert batch['image'].std() > 10
    labels, _ = _eval_examples(data, config)
    expected = [int(e['label']) for e in data.examples('eval').as_numpy_iterator()]
  assert len(expected) == 21 and labels == expected  # each example exactly once, in order


# cache=True (the quickstart's and CIFAR-10's setting) decodes each split into memory once.
@pytest.mark.parametrize('cache', [True, False])
def test_cifar10_path_on_mock_data(cache):
  config = _config(cifar10.get_config(), batch_size=16, eval_batch_size=24, download=True,
                   cache=cache)
  with tfds.testing.mock_data(num_examples=30):
    data = input_pipeline.load(config)
    assert (data.arrays('train') is not None) == cache
    batch = next(_train_batches(data, config))
    assert batch['image'].shape == (DEVICES, 2, 32, 32, 3)
    labels, padding = _eval_examples(data, config)
    streamed = [int(e['label']) for e in
                input_pipeline.load(_config(config, cache=False)).examples('eval')]
  assert labels == streamed and padding % 24 == 18  # 30 examples in batches of 24


# A buffer that holds the whole split permutes in-memory examples by index; a smaller one streams.
@pytest.mark.parametrize('shuffle_buffer', [60_000, 32])
def test_train_order_is_a_function_of_the_step(shuffle_buffer):
  config = _config(quickstart.get_config(), dataset='synthetic', image_size=32, num_classes=4,
                   synthetic_train_examples=64, batch_size=16, shuffle_buffer=shuffle_buffer)
  data = input_pipeline.load(config)
  stream = _train_batches(data, config)
  first = [next(stream) for _ in range(7)]  # 4 steps per epoch: crosses an epoch boundary
  for start in (3, 5):
    resumed = next(_train_batches(data, config, start))
    for key in ('image', 'label'):
      np.testing.assert_array_equal(resumed[key], first[start][key])
  assert not np.array_equal(first[0]['label'], first[4]['label'])  # epochs are reshuffled
  # With an end step, the same batches and then the end (nothing left in flight to wait for).
  per_epoch = input_pipeline.steps_per_epoch(data, config.batch_size)
  ended = list(input_pipeline.train_batches(data, config, per_epoch, start_step=2, end_step=7))
  assert len(ended) == 5
  for batch, expected in zip(ended, first[2:7]):
    np.testing.assert_array_equal(batch['image'], expected['image'])
  # Every example once per epoch.
  epoch = np.concatenate([b['label'].reshape(-1) for b in first[:4]])
  assert sorted(epoch) == sorted(e['label'] for e in data.examples('train').as_numpy_iterator())


def test_pad_crop_and_flip_of_a_batch():
  config = _config(quickstart.get_config(), image_size=6, crop_padding=2)
  images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3)).astype(np.uint8)
  # Per example: row offset, column offset (uniform draws scaled to 0..4) and flip (< 0.5).
  draws = np.array([[0.0, 0.0, 0.9], [0.99, 0.99, 0.1], [0.5, 0.1, 0.6], [0.3, 0.7, 0.2],
                    [0.45, 0.45, 0.5]], np.float32)
  out = input_pipeline.pad_crop_and_flip({'image': tf.constant(images), 'label': tf.range(5)},
                                         tf.constant(draws), config)
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for image, image_draws, result in zip(padded, draws, out['image'].numpy()):
    row, col = (image_draws[:2] * 5).astype(int)
    expected = image[row:row + 6, col:col + 6]
    if image_draws[2] < 0.5:
      expected = expected[:, ::-1]
    np.testing.assert_array_equal(result, expected)
  np.testing.assert_array_equal(out['label'], np.arange(5))
  # Without padding only the flips remain.
  config.crop_padding = 0
  flipped = input_pipeline.pad_crop_and_flip(
      {'image': tf.constant(images), 'label': tf.range(5)}, tf.constant(draws), config)['image']
  expected = np.where((draws[:, 2] < 0.5)[:, None, None, None], images[:, :, ::-1], images)
  np.testing.assert_array_equal(flipped, expected)


def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_local_idx_files(tmp_path):
  rng = np.random.default_rng(0)
  files = {}
  for prefix, n in (('train', 12), ('t10k', 5)):
    files[prefix] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
    _write_idx(tmp_path / f'{prefix}-images-idx3-ubyte.gz', files[prefix][0])
    _write_idx(tmp_path / f'{prefix}-labels-idx1-ubyte.gz', files[prefix][1])
  np.testing.assert_array_equal(input_pipeline.read_idx(
      str(tmp_path / 'train-images-idx3-ubyte.gz')), files['train'][0])
  config = _config(quickstart.get_config(), data_dir=str(tmp_path / 'tfds'),
                   fashion_mnist_files=str(tmp_path), download=False, cache=False, image_size=32)
  data = input_pipeline.load(config)
  assert (data.num_train, data.num_eval) == (12, 5)
  assert os.path.isdir(tmp_path / 'tfds' / 'fashion_mnist')  # a real TFDS data set on disk
  for split, prefix in (('train', 'train'), ('eval', 't10k')):
    # Streams hold the encoded PNGs; TFDS stores the examples in its own shuffled order: compare
    # as collections.
    stored = sorted((tf.io.decode_png(e['image']).numpy()[..., 0].tobytes(), int(e['label']))
                    for e in data.examples(split))
    images, labels = files[prefix]
    assert stored == sorted((i.astype(np.uint8).tobytes(), int(l)) for i, l in zip(images, labels))
  batch = next(input_pipeline.eval_batches(data, _config(config, eval_batch_size=8)))
  assert batch['image'].shape == (DEVICES, 1, 32, 32, 3)  # grayscale 28 px -> RGB 32 px


FASHION_MNIST_FILES = default.get_config().fashion_mnist_files


@pytest.mark.skipif(not os.path.exists(os.path.join(FASHION_MNIST_FILES,
                                                    'train-images-idx3-ubyte.gz')),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_files():
  for prefix, n in (('train', 60_000), ('t10k', 10_000)):
    images = input_pipeline.read_idx(
        os.path.join(FASHION_MNIST_FILES, f'{prefix}-images-idx3-ubyte.gz'))
    labels = input_pipeline.read_idx(
        os.path.join(FASHION_MNIST_FILES, f'{prefix}-labels-idx1-ubyte.gz'))
    assert images.shape == (n, 28, 28) and labels.shape == (n,)
    assert sorted(np.unique(labels)) == list(range(10))


def _image_folder(root, sizes=((40, 30), (25, 50))):
  rng = np.random.default_rng(0)
  count = 0
  for label, name in enumerate(('cat', 'dog', 'fish')):
    os.makedirs(root / name)
    for i in range(10):
      h, w = sizes[i % 2]
      if i % 3 == 0:
        pixels = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)  # grayscale PNG
        data = tf.io.encode_png(pixels).numpy()
        suffix = 'png'
      else:
        pixels = np.full((h, w, 3), 40 * label + 2 * i + 10, np.uint8)
        data = tf.io.encode_jpeg(pixels).numpy()
        suffix = 'jpg'
      (root / name / f'{i}.{suffix}').write_bytes(data)
      count += 1
  (root / 'dog' / 'notes.txt').write_text('not an image')
  return count


def test_image_folder_dataset(tmp_path):
  total = _image_folder(tmp_path / 'images')
  config = _config(mobilenet_v2.get_config('res=32'), dataset=f'folder:{tmp_path / "images"}',
                   num_classes=3, batch_size=8, eval_batch_size=8, folder_eval_fraction=0.3)
  data = input_pipeline.load(config)
  assert data.num_train + data.num_eval == total and 0 < data.num_eval < total
  batch = next(_train_batches(data, config))
  assert batch['image'].shape == (DEVICES, 1, 32, 32, 3)
  labels, _ = _eval_examples(data, config)
  assert len(labels) == data.num_eval and set(labels) <= {0, 1, 2}
  # The held-out split is fixed by the file names.
  again = input_pipeline.load(config)
  assert [e['label'] for e in again.examples('eval').as_numpy_iterator()] == [
      e['label'] for e in data.examples('eval').as_numpy_iterator()]
  with pytest.raises(ValueError, match='num_classes=5, but .* has 3 class folders'):
    input_pipeline.load(_config(config, num_classes=5))
  with pytest.raises(ValueError, match='does not exist'):
    input_pipeline.load(_config(config, dataset=f'folder:{tmp_path / "nowhere"}'))
  # A file that is not an image is named before anything trains.
  (tmp_path / 'images' / 'cat' / 'broken.jpg').write_bytes(b'<html>not an image</html>')
  with pytest.raises(ValueError, match=r'cat/broken.jpg is not a JPEG, PNG, GIF or BMP image'):
    input_pipeline.load(_config(config, dataset=f'folder:{tmp_path / "images"}'))
  # A JPEG cut short passes that check; decoding it is one error too.
  jpeg = (tmp_path / 'images' / 'cat' / '1.jpg').read_bytes()
  (tmp_path / 'images' / 'cat' / 'broken.jpg').write_bytes(jpeg[:len(jpeg) // 3])
  data = input_pipeline.load(_config(config, num_classes=3, folder_eval_fraction=0.0))
  batches = _train_batches(data, config)
  with pytest.raises(ValueError, match=r'An image of .*images does not decode \(.*JPEG'):
    for _ in range(10 * input_pipeline.steps_per_epoch(data, config.batch_size)):  # 10 epochs
      next(batches)


def _key(example):
  image = example['image']
  return image if isinstance(image, bytes) else image.tobytes()


@pytest.mark.parametrize('source', ['synthetic', 'folder'])
def test_process_shards_are_disjoint_and_cover_the_split(tmp_path, monkeypatch, source):
  if source == 'folder':
    _image_folder(tmp_path / 'images')
    config = _config(mobilenet_v2.get_config('res=32'), dataset=f'folder:{tmp_path / "images"}',
                     num_classes=3, folder_eval_fraction=0.3)
  else:
    config = _config(mobilenet_v2.get_config('res=32'), dataset='synthetic', num_classes=4,
                     synthetic_train_examples=37, synthetic_eval_examples=11)
  config = _config(config, batch_size=16, eval_batch_size=16)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  parts = {}
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    data = input_pipeline.load(config)
    parts[index] = {split: [_key(e) for e in data.examples(split).as_numpy_iterator()]
                    for split in ('train', 'eval')}
    batches = list(input_pipeline.eval_batches(data, config))
    assert len(batches) == 1 and batches[0]['image'].shape[:2] == (DEVICES, 1)  # 8 per process
    assert batches[0]['mask'].sum() == data.local_count('eval')
  monkeypatch.undo()
  whole = input_pipeline.load(config)
  for split in ('train', 'eval'):
    assert not set(parts[0][split]) & set(parts[1][split])
    assert sorted(parts[0][split] + parts[1][split]) == sorted(
        _key(e) for e in whole.examples(split).as_numpy_iterator())


def test_missing_dataset_error(tmp_path):
  config = _config(mobilenet_v2.get_config(), data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"Dataset 'imagenet2012' is not prepared in .*"
                                       r"downloads/manual.*tfds build imagenet2012"):
    input_pipeline.load(config)
  config = _config(cifar10.get_config(), data_dir=str(tmp_path), download=False)
  with pytest.raises(ValueError, match=r"Dataset 'cifar10' is not prepared in "
                                       f"{tmp_path}.*tfds build cifar10"):
    input_pipeline.load(config)
  with pytest.raises(ValueError, match="Unknown dataset 'imagenet2013'"):
    input_pipeline.load(_config(config, dataset='imagenet2013'))


@pytest.mark.slow
def test_throughput_command():
  out = run_tool('input_pipeline.py', '--config=configs/quickstart.py', '--throughput',
                 '--steps=5', '--config.dataset=synthetic', '--config.num_classes=4', check=True)
  assert 'training images/s on this host' in out.stdout


def test_download_and_prepare_path_offline(tmp_path, monkeypatch):
  """config.download=True runs TFDS's download_and_prepare; here for the registered cifar10 with
  its archive served from local files, so that a missing dependency of that path fails here."""
  rng = np.random.default_rng(0)
  batches = tmp_path / 'archive' / 'cifar-10-batches-bin'
  batches.mkdir(parents=True)
  labels = {}
  for name in [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']:
    labels[name] = rng.integers(0, 10, 3)
    records = [np.concatenate([[label], rng.integers(0, 256, 3072)]) for label in labels[name]]
    (batches / name).write_bytes(np.concatenate(records).astype(np.uint8).tobytes())
  (batches / 'batches.meta.txt').write_text('\n'.join(f'class{i}' for i in range(10)))
  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                      lambda self, url: str(tmp_path / 'archive'))
  config = _config(cifar10.get_config(), data_dir=str(tmp_path / 'tfds'), download=True,
                   cache=False)
  data = input_pipeline.load(config)
  assert (data.num_train, data.num_eval) == (15, 3)
  assert sorted(int(e['label']) for e in data.examples('eval')) == sorted(
      labels['test_batch.bin'])


class _NumberedImagenet(make_imagenet_like.ImagenetLike, skip_registration=True):
  """`imagenet2012` of small generated JPEGs labelled with their index; the JPEGs of `broken`
  cut short (they read, but do not decode)."""
  name = 'imagenet2012'

  def __init__(self, *, broken=(), **kwargs):
    self._broken = broken
    super().__init__(**kwargs)

  def _generate_examples(self, split, count):
    rng = np.random.default_rng(0)
    for index in range(count):
      jpeg = make_imagenet_like.generated_jpeg(rng, 48, 64)
      if index in self._broken:
        jpeg = jpeg[:len(jpeg) // 3]
      yield f'{split}{index}', {'file_name': f'{index}.JPEG', 'image': io.BytesIO(jpeg),
                                'label': index}


def _numbered_imagenet(data_dir, broken=()):
  _NumberedImagenet(data_dir=str(data_dir), broken=broken,
                    split_sizes={'train': 3 * DEVICES, 'validation': 2}).download_and_prepare(
                        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  config = _config(mobilenet_v2.get_config('res=32'), data_dir=str(data_dir), batch_size=DEVICES,
                   eval_batch_size=DEVICES)
  return input_pipeline.load(config), config


def test_resuming_does_not_decode_the_examples_it_skips(tmp_path):
  data, config = _numbered_imagenet(tmp_path / 'good')
  assert data.examples('train').element_spec['image'].dtype == tf.string  # shuffled encoded
  good = list(itertools.islice(_train_batches(data, config), 2))
  first_step = set(good[0]['label'].reshape(-1).tolist())
  # The same data set with the JPEGs of step 0 broken: resuming at step 1 reads them into the
  # shuffle buffer and skips them without decoding; starting at step 0 decodes them and fails.
  broken, config = _numbered_imagenet(tmp_path / 'broken', broken=first_step)
  resumed = next(_train_batches(broken, config, start_step=1))
  for key in ('image', 'label'):
    np.testing.assert_array_equal(resumed[key], good[1][key])
  with pytest.raises(ValueError, match='does not decode'):
    next(_train_batches(broken, config))


def test_jpeg_training_crop_decodes_only_its_window():
  """decode_and_crop_jpeg gives the pixels of a full decode cut to the same window (exactly
  without chroma subsampling; with it, libjpeg's chroma upsampling differs by a few grey levels
  along the window's right edge); other formats decode whole; grayscale becomes RGB."""
  config = mobilenet_v2.get_config()
  rng = np.random.default_rng(0)
  image = np.asarray(tf.io.decode_jpeg(make_imagenet_like.generated_jpeg(rng, 75, 100)))
  seed = tf.constant([3, 4], tf.int64)
  for channels in (3, 1):
    pixels = image if channels == 3 else image[..., :1]
    png = tf.io.encode_png(pixels)
    for subsampled in (False, True):
      jpeg = tf.io.encode_jpeg(pixels, quality=95, chroma_downsampling=subsampled)
      decoded = tf.io.decode_jpeg(jpeg, channels=3)
      window = input_pipeline._inception_crop(decoded, seed, config).numpy().astype(int)
      assert window.shape[2] == 3 and window.shape[:2] != decoded.shape[:2]
      difference = np.abs(input_pipeline._inception_crop(jpeg, seed, config).numpy() - window)
      assert difference.max() == 0 if not subsampled else difference.mean() < 0.1
    np.testing.assert_array_equal(input_pipeline._inception_crop(png, seed, config),
                                  input_pipeline._inception_crop(tf.constant(pixels), seed, config))


def test_imagenet_like_data_set_reads_as_imagenet2012(tmp_path):
  builder = make_imagenet_like.prepare(str(tmp_path), train_examples=4, validation_examples=2)
  assert builder.info.full_name == 'imagenet2012/5.1.0'
  config = _config(mobilenet_v2.get_config('res=64'), data_dir=str(tmp_path), batch_size=DEVICES,
                   eval_batch_size=DEVICES, shuffle_buffer=4)
  data = input_pipeline.load(config)
  assert (data.num_train, data.num_eval) == (4, 2)
  sizes = []
  for example in data.examples('train'):
    assert tf.io.is_jpeg(example['image'])
    sizes.append(len(example['image'].numpy()))
    assert tuple(tf.image.extract_jpeg_shape(example['image'])[:2]) in make_imagenet_like.SIZES
  assert 50_000 < np.mean(sizes) < 200_000  # ImageNet's JPEGs average about 110 kB
  labels, padding = _eval_examples(data, config)
  assert len(labels) == 2 and padding == DEVICES - 2
