r"""Prepares an ImageNet-shaped stand-in for `imagenet2012` from generated JPEGs, offline.

    python tools/make_imagenet_like.py --data_dir=/tmp/imagenet_like --train_examples=2000
    python input_pipeline.py --config=configs/mobilenet_v2.py \
        --config.data_dir=/tmp/imagenet_like --throughput --steps=20

The data set is TFDS's own `imagenet2012` (the same name, version, features and 1000 classes,
read by the same code path as the real one) with its examples replaced: JPEGs of ImageNet's most
common sizes (500x375, 375x500, 500x333, 500x500, 333x500) and about ImageNet's mean file size
(~105 kB, quality 90), each a smooth random colour field with texture and grain at three scales, so
that decoding costs what it costs on photographs. Labels are random. It measures the input
pipeline, nothing else: nothing can be learned from it.
"""

import io
import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# (height, width) and their shares among the generated images.
SIZES = ((375, 500), (500, 375), (333, 500), (500, 500), (500, 333))
SIZE_SHARES = (0.5, 0.15, 0.15, 0.1, 0.1)
# The random colour field: (cells along the height, amplitude in grey levels) per scale.
SCALES = ((4, 90), (16, 45), (64, 25))
GRAIN = 20  # standard deviation of the per-pixel noise, grey levels
QUALITY = 90
NUM_CLASSES = 1000


def generated_jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  """One JPEG of height x width: colour fields at SCALES, enlarged bicubically, plus GRAIN."""
  image = np.full((height, width, 3), 128.0, np.float32)
  for cells, amplitude in SCALES:
    field = rng.uniform(128 - amplitude, 128 + amplitude, (cells, -(-cells * width // height), 3))
    enlarged = Image.fromarray(field.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    image += np.asarray(enlarged, np.float32) - 128
  image += rng.normal(0, GRAIN, image.shape)
  encoded = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(encoded, 'JPEG', quality=QUALITY)
  return encoded.getvalue()


class ImagenetLike(tfds.builder_cls('imagenet2012'), skip_registration=True):
  """`imagenet2012` with generated examples (see the module's docstring)."""
  name = 'imagenet2012'

  def __init__(self, *, split_sizes: dict[str, int], seed: int = 0, **kwargs):
    self._split_sizes = split_sizes
    self._seed = seed
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, count)
            for split, count in self._split_sizes.items()}

  def _generate_examples(self, split, count):  # pytype: disable=signature-mismatch
    rng = np.random.default_rng([self._seed, list(self._split_sizes).index(split)])
    for index in range(count):
      height, width = SIZES[rng.choice(len(SIZES), p=SIZE_SHARES)]
      name = f'{split}_{index:08d}.JPEG'
      yield name, {'file_name': name, 'image': io.BytesIO(generated_jpeg(rng, height, width)),
                   'label': int(rng.integers(NUM_CLASSES))}


def prepare(data_dir: str, train_examples: int, validation_examples: int,
            seed: int = 0) -> tfds.core.DatasetBuilder:
  """Writes the data set into `data_dir` and returns TFDS's `imagenet2012` builder over it."""
  builder = ImagenetLike(data_dir=data_dir, seed=seed,
                         split_sizes={'train': train_examples, 'validation': validation_examples})
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return tfds.builder('imagenet2012', data_dir=data_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for name in ('train_examples', 'validation_examples'):
    if flags.FLAGS[name].value < 1:
      raise app.UsageError(f'--{name} must be at least 1, got {flags.FLAGS[name].value}.')
  builder = prepare(flags.FLAGS.data_dir, flags.FLAGS.train_examples,
                    flags.FLAGS.validation_examples, flags.FLAGS.seed)
  size = sum(os.path.getsize(os.path.join(builder.data_path, f))
             for f in os.listdir(builder.data_path))
  print(f'{builder.info.full_name} in {builder.data_dir}: {dict(builder.info.splits)}, '
        f'{size / 1e6:.0f} MB')


if __name__ == '__main__':
  flags.DEFINE_string('data_dir', None, 'TFDS data directory to write imagenet2012 into.')
  flags.DEFINE_integer('train_examples', 2000, 'Generated training images.')
  flags.DEFINE_integer('validation_examples', 200, 'Generated validation images.')
  flags.DEFINE_integer('seed', 0, 'Seed of the images and labels.')
  flags.mark_flag_as_required('data_dir')
  app.run(main)
