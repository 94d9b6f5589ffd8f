r"""Top-k classes of image files under the latest checkpoint of a workdir.

    python predict.py --workdir=runs/slim_v2_1.0_224 cat.jpg dog.png
    python predict.py --workdir=runs/quickstart --json --top_k=3 shirt.png
    python predict.py --tflite=runs/quickstart/model_int8.tflite shirt.png

The workdir is one that main.py or convert.py wrote; its config.json gives the network, the
input size, normalization and class offset, and the data set whose class names are printed
(ImageNet: the WordNet synset and the name from configs/imagenet2012_names.txt, which lists the
1000 classes in the order of TFDS's imagenet2012 labels). Images are resized and center-cropped
as for evaluation. `--tflite` runs a file that export.py wrote, on the LiteRT runtime, with the
exporting run's config from the JSON file beside it.
"""

import json
import os
import sys
from typing import Optional

from absl import app
from absl import flags
import jax
import numpy as np
import tensorflow as tf

import cli
import input_pipeline
import models
import workdirs

IMAGENET_NAMES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                              'imagenet2012_names.txt')


def class_names(config) -> Optional[list[str]]:
  """Names of the data set's classes in label order ('n01440764 tench' for ImageNet); None if
  the data set does not name them."""
  if config.dataset.startswith(('synthetic', 'folder:')):
    return None
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    names = tfds.builder(config.dataset).info.features['label'].names
  except Exception:  # pylint: disable=broad-except  # an unknown or unregistered data set
    return None
  if config.dataset.split(':')[0] == 'imagenet2012':
    with open(IMAGENET_NAMES) as f:
      names = [f'{synset} {name}' for synset, name in zip(names, f.read().splitlines())]
  return names


def load(workdir: str, ema: bool = False):
  """(config, a function from a batch of preprocessed images to probabilities over the data
  set's labels) for the latest checkpoint in `workdir`."""
  config, variables = workdirs.load_for_inference(workdir, ema)
  model = models.get_model(config)

  @jax.jit
  def probabilities(images):
    logits = model.apply(variables, images, train=False)[:, config.label_offset:]
    return jax.nn.softmax(logits)
  return config, probabilities


def load_tflite(path: str):
  """(config, probabilities) as `load` gives them, for a LiteRT file that export.py wrote."""
  import export  # pylint: disable=g-import-not-at-top
  runner = export.Runner(path)
  config = runner.config()

  def probabilities(images):
    logits = runner.logits(np.asarray(images))[:, config.label_offset:]
    return jax.nn.softmax(logits)
  return config, probabilities


def preprocess(path: str, config) -> np.ndarray:
  """The image file at `path` as evaluation sees it (resize, center crop, normalize)."""
  example = {'image': tf.io.read_file(path), 'label': 0}
  return input_pipeline.preprocess_eval(example, config)['image'].numpy()


def predict(workdir: str, paths: list[str], top_k: int = 5, ema: bool = False,
            tflite: str = '') -> list[dict]:
  """For each image: {'image', 'top': [{'label', 'probability', 'name'?}, ...]}, or {'image',
  'error'} for a file that is not an image we can read; under the latest checkpoint of `workdir`,
  or the exported `tflite` file."""
  config, probabilities = load_tflite(tflite) if tflite else load(workdir, ema)
  names = class_names(config)
  results = []
  for path in paths:
    try:
      input_pipeline.check_image_file(path)
      image = preprocess(path, config)
    except ValueError as e:
      results.append({'image': path, 'error': str(e)})
      continue
    except tf.errors.OpError as e:
      results.append({'image': path, 'error': f'{path} does not decode ({e.message.strip()}).'})
      continue
    probs = np.asarray(probabilities(image[None]))[0]
    top = np.argsort(-probs, kind='stable')[:top_k]
    results.append({'image': path, 'top': [
        {'label': int(k), 'probability': float(probs[k]),
         **({'name': names[k]} if names and k < len(names) else {})} for k in top]})
  return results


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give one or more image files after the flags.')
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.tflite):
    raise app.UsageError('Give --workdir or --tflite.')
  if f.tflite and f.ema:
    raise app.UsageError('--ema chooses weights of a workdir; an exported file has its own.')
  try:
    results = predict(f.workdir, paths, f.top_k, f.ema, f.tflite)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  if flags.FLAGS.json:
    json.dump(results, sys.stdout, indent=1)
    print()
  else:
    for result in results:
      print(result['image'])
      for entry in result.get('top', ()):
        print(f'  {entry["probability"]:7.2%}  {entry["label"]:4d}  {entry.get("name", "")}')
  failed = [r for r in results if 'error' in r]
  if failed:
    raise SystemExit('\n'.join(f'error: {r["error"]}' for r in failed))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Workdir of main.py or convert.py.')
  flags.DEFINE_string('tflite', None, 'A LiteRT file of export.py, instead of --workdir.')
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image.')
  flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')
  flags.DEFINE_bool('ema', False, 'Use the moving averages of the weights.')
  app.run(main, flags_parser=cli.parse_flags)
