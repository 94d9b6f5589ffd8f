r"""LiteRT (TFLite) export of a checkpoint, evaluation of an exported file and its latency.

    python export.py --workdir=runs/quickstart --output=runs/quickstart/model.tflite
    python export.py --workdir=runs/quickstart --output=runs/quickstart/model_int8.tflite \
        --quantize=int8 [--calibration_steps=10] [--calibration_data=fashion_mnist] [--int8_io]
    python export.py --evaluate=runs/quickstart/model_int8.tflite [--config=configs/quickstart.py]
    python export.py --latency=runs/quickstart/model.tflite [--threads=1] [--runs=200]

The file holds the network for one image of the run's `image_size`, normalized as the run's
config says; FILE.json beside it records that normalization, the class offset and count, the data
set and the quantization of the input and output. The path is jax2tf (native serialization) ->
tf.function -> TFLiteConverter: BatchNorm folds into the convolutions, depthwise convolutions
become DEPTHWISE_CONV_2D and grouped ones CONV_2D. `--quantize=int8` is full-integer
post-training quantization (int8 weights, per channel, and int8 activations) calibrated on batches
of the run's training data through our input pipeline; the input and output stay float unless
`--int8_io`. Files run on the LiteRT runtime (`ai-edge-litert`).
"""

import json
import os
import platform
import statistics
import time
from typing import Optional

from absl import app
from absl import flags
from absl import logging
from jax.experimental import jax2tf
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from ml_collections import config_flags

import cli
import input_pipeline
import models
import workdirs

QUANTIZATIONS = ('none', 'int8')
# int8 calibration: batches of CALIBRATION_BATCH training images, drawn through a shuffle buffer
# of CALIBRATION_SHUFFLE examples.
CALIBRATION_BATCH = 32
CALIBRATION_SHUFFLE = 10_000
# What evaluating an exported file takes from the exporting run's config: its preprocessing.
PREPROCESSING = ('image_size', 'augment', 'eval_crop_fraction', 'normalization_mean',
                 'normalization_std', 'label_offset')


def metadata_path(tflite_path: str) -> str:
  """FILE.json beside FILE.tflite."""
  return os.path.splitext(tflite_path)[0] + '.json'


def calibration_images(config: ml_collections.ConfigDict, steps: int,
                       dataset: str = '') -> np.ndarray:
  """`steps` batches of CALIBRATION_BATCH training images of `dataset` (default: the config's),
  preprocessed as for evaluation: what the network sees at inference."""
  if dataset:
    config = workdirs.with_settings(config, {'dataset': dataset})
  data = input_pipeline.load(config)
  examples = data.examples('train').shuffle(CALIBRATION_SHUFFLE, seed=0)
  images = examples.map(lambda e: input_pipeline.preprocess_eval(e, config)['image']).batch(
      CALIBRATION_BATCH).take(steps)
  return np.concatenate(list(images.as_numpy_iterator()))


def convert(config: ml_collections.ConfigDict, variables: dict, quantize: str = 'none',
            calibration: Optional[np.ndarray] = None, int8_io: bool = False) -> bytes:
  """The LiteRT flatbuffer of `config`'s network with `variables`, batch 1."""
  # Convolutions stay convolution ops, in float32 whatever precision the run trained in.
  model = models.get_model(config, conv_impl='xla', dtype=jnp.float32)
  size = config.image_size
  def logits(image):
    return model.apply(variables, image, train=False)
  function = tf.function(
      jax2tf.convert(logits, with_gradient=False), autograph=False,
      input_signature=[tf.TensorSpec((1, size, size, 3), tf.float32, name='image')])
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [function.get_concrete_function()], function)
  if quantize == 'int8':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
      converter.inference_input_type = tf.int8
      converter.inference_output_type = tf.int8
  return converter.convert()


def export(workdir: str, output: str, quantize: str = 'none', ema: bool = False,
           calibration_steps: int = 10, calibration_data: str = '',
           int8_io: bool = False) -> dict:
  """Writes the latest checkpoint of `workdir` to `output` (.tflite) and its metadata beside it
  (`metadata_path`); returns the metadata. Both are written elsewhere and moved into place."""
  if quantize not in QUANTIZATIONS:
    raise ValueError(f'--quantize must be one of {", ".join(QUANTIZATIONS)}, got {quantize!r}.')
  if not output.endswith('.tflite'):
    raise ValueError(f'--output={output}: LiteRT files end in .tflite.')
  if calibration_steps < 1:
    raise ValueError(f'--calibration_steps must be >= 1, got {calibration_steps}.')
  config, variables = workdirs.load_for_inference(workdir, ema)
  calibration = None
  if quantize == 'int8':
    calibration = calibration_images(config, calibration_steps, calibration_data)
  flatbuffer = convert(config, variables, quantize, calibration, int8_io)
  metadata = {
      'workdir': workdir, 'ema': ema, 'quantize': quantize, 'int8_io': int8_io,
      'model': config.model.to_dict(), 'dataset': config.dataset,
      'image_size': config.image_size, 'num_classes': config.num_classes,
      'label_offset': config.label_offset,
      'normalization_mean': list(config.normalization_mean),
      'normalization_std': list(config.normalization_std),
      'input': 'one image, (1, image_size, image_size, 3) RGB: (pixels - mean) / std',
      'output': 'logits (1, num_classes + label_offset); label k is logit k + label_offset',
      'calibration': (None if calibration is None else
                      {'images': len(calibration), 'dataset': calibration_data or config.dataset}),
      'config': config.to_dict(),
  }
  write_file(output, flatbuffer, metadata)
  return metadata


def write_file(output: str, flatbuffer: bytes, metadata: dict) -> None:
  """Writes `flatbuffer` to `output` and `metadata` beside it, each moved into place."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  workdirs.write_atomic(output, flatbuffer)
  workdirs.write_json_atomic(metadata_path(output), metadata)


class Runner:
  """A LiteRT interpreter over an exported file, with its metadata: `logits(images)` runs float
  images (normalized) through it, quantizing and dequantizing int8 input and output."""

  def __init__(self, path: str, threads: int = 1):
    from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(path):
      raise ValueError(f'{path} does not exist.')
    with open(path, 'rb') as f:
      content = f.read()
    if content[4:8] != b'TFL3':
      raise ValueError(f'{path} is not a LiteRT (TFLite) file: export one with export.py.')
    meta_path = metadata_path(path)
    if not os.path.isfile(meta_path):
      raise ValueError(f'{path} has no {os.path.basename(meta_path)} beside it: export.py writes '
                       'it with the file.')
    with open(meta_path) as f:
      self.metadata = json.load(f)
    self.path = path
    self.interpreter = litert.Interpreter(model_content=content, num_threads=threads)
    self.runtime = 'XNNPACK'
    try:
      self.interpreter.allocate_tensors()
    except RuntimeError as e:
      # XNNPACK refuses graphs it cannot prepare (an int8 tensor with a scale of 1e36, from a -inf
      # padding in the calibration, was one); LiteRT's builtin kernels run them.
      logging.warning("%s: XNNPACK refused the graph (%s); running it on LiteRT's builtin "
                      'kernels.', path, ' '.join(str(e).split())[:200])
      self.interpreter = litert.Interpreter(
          model_content=content, num_threads=threads,
          experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
      self.interpreter.allocate_tensors()
      self.runtime = 'builtin kernels'
    self.input = self.interpreter.get_input_details()[0]
    self.output = self.interpreter.get_output_details()[0]

  def config(self) -> ml_collections.ConfigDict:
    """The exporting run's config (its preprocessing, data set and classes)."""
    return ml_collections.ConfigDict(self.metadata['config'])

  def invoke(self, image: np.ndarray) -> np.ndarray:
    """Logits of one normalized image (H, W, 3), float."""
    image = image[None]
    if self.input['dtype'] == np.int8:
      scale, zero = self.input['quantization']
      image = np.clip(np.round(image / scale + zero), -128, 127).astype(np.int8)
    self.interpreter.set_tensor(self.input['index'], image.astype(self.input['dtype']))
    self.interpreter.invoke()
    logits = self.interpreter.get_tensor(self.output['index'])[0]
    if self.output['dtype'] == np.int8:
      scale, zero = self.output['quantization']
      logits = (logits.astype(np.float32) - zero) * scale
    return logits

  def logits(self, images: np.ndarray) -> np.ndarray:
    return np.stack([self.invoke(image) for image in images])


def ops_and_tensor_types(path: str) -> tuple[set[str], set[str]]:
  """The operator names and tensor types of the LiteRT file at `path`, read from the file (no
  delegate rewrites it)."""
  from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top
  interpreter = litert.Interpreter(
      model_path=path,
      experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  ops = {op['op_name'] for op in interpreter._get_ops_details()}  # pylint: disable=protected-access
  types = {np.dtype(t['dtype']).name for t in interpreter.get_tensor_details()}
  return ops, types


def evaluate(path: str, config: Optional[ml_collections.ConfigDict] = None) -> dict:
  """Top-1 and top-5 of the exported file over the whole eval split of `config` (default: the
  exporting run's config), through our eval pipeline; every example counted once."""
  runner = Runner(path)
  exported = runner.config()
  if config is not None:
    config = workdirs.with_settings(config, workdirs.settings_of(exported, PREPROCESSING))
  else:
    config = exported
  data = input_pipeline.load(config)
  hits1 = hits5 = count = 0
  for batch in input_pipeline.eval_batches(data, config):
    images = batch['image'].reshape(-1, *batch['image'].shape[2:])
    labels = batch['label'].reshape(-1)
    mask = batch['mask'].reshape(-1) > 0
    logits = runner.logits(images[mask])[:, config.label_offset:]
    top5 = np.argsort(-logits, axis=-1, kind='stable')[:, :5]
    hits1 += int((top5[:, 0] == labels[mask]).sum())
    hits5 += int((top5 == labels[mask][:, None]).any(axis=-1).sum())
    count += int(mask.sum())
  return {'file': path, 'top1': hits1 / count, 'top5': hits5 / count, 'count': count}


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def measure_latency(path: str, threads: int = 1, runs: int = 100, warmup: int = 10) -> dict:
  """Latency of single-image invocations: `warmup` runs, then the median and spread of `runs`."""
  if runs < 1 or threads < 1:
    raise ValueError(f'--runs and --threads must be >= 1, got {runs} and {threads}.')
  runner = Runner(path, threads)
  size = runner.metadata['image_size']
  image = np.random.default_rng(0).normal(size=(size, size, 3)).astype(np.float32)
  for _ in range(warmup):
    runner.invoke(image)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    runner.invoke(image)
    times.append(1000 * (time.perf_counter() - start))
  quartiles = statistics.quantiles(times, n=4) if runs > 1 else [times[0]] * 3
  return {'file': path, 'threads': threads, 'runs': runs,
          'median_ms': statistics.median(times), 'p25_ms': quartiles[0], 'p75_ms': quartiles[2],
          'min_ms': min(times), 'max_ms': max(times), 'size_bytes': os.path.getsize(path),
          'runtime': runner.runtime, 'cpu': cpu_model()}


def float_and_int8_latency(float_path: str, int8_path: str, runs: int) -> dict:
  """The single-image latency (one thread) and size of a float and an int8 file."""
  float_time = measure_latency(float_path, runs=runs)
  int8_time = measure_latency(int8_path, runs=runs)
  return {
      'latency_ms': float_time['median_ms'], 'int8_latency_ms': int8_time['median_ms'],
      'latency_quartiles_ms': [float_time['p25_ms'], float_time['p75_ms']],
      'int8_latency_quartiles_ms': [int8_time['p25_ms'], int8_time['p75_ms']],
      'tflite_bytes': float_time['size_bytes'], 'int8_tflite_bytes': int8_time['size_bytes'],
      'threads': 1, 'runs': runs, 'latency_cpu': float_time['cpu'],
      'runtime': float_time['runtime'], 'int8_runtime': int8_time['runtime'],
  }


def export_and_measure(workdir: str, directory: str, runs: int = 200) -> dict:
  """Exports the latest checkpoint of `workdir` as float and int8 files into `directory`, times
  both (one thread), evaluates the int8 file, and writes the figures to
  `directory/export.json`, which it returns."""
  float_path = os.path.join(directory, 'model.tflite')
  int8_path = os.path.join(directory, 'model_int8.tflite')
  export(workdir, float_path)
  export(workdir, int8_path, quantize='int8')
  result = float_and_int8_latency(float_path, int8_path, runs)
  result['int8_top1'] = evaluate(int8_path)['top1']
  workdirs.write_json_atomic(os.path.join(directory, 'export.json'), result)
  return result


def untrained_latency(config: ml_collections.ConfigDict, directory: str, runs: int = 50,
                      calibration_images: int = 8) -> dict:
  """Exports `config`'s network with untrained weights (He-normal kernels; latency does not
  depend on the values) as float and int8 files into `directory`, the int8 one calibrated on
  generated images, times both (one thread) and writes the figures to `directory/latency.json`,
  which it returns. Needs no data set and no training."""
  variables = models.random_variables(models.get_model(config), config.image_size)
  calibration = np.random.default_rng(0).normal(
      size=(calibration_images, config.image_size, config.image_size, 3)).astype(np.float32)
  metadata = {'untrained': True, 'model': config.model.to_dict(), 'dataset': config.dataset,
              'image_size': config.image_size, 'num_classes': config.num_classes,
              'config': config.to_dict()}
  paths = {}
  for quantize, name in (('none', 'model.tflite'), ('int8', 'model_int8.tflite')):
    paths[quantize] = os.path.join(directory, name)
    write_file(paths[quantize], convert(config, variables, quantize, calibration),
               dict(metadata, quantize=quantize))
  result = float_and_int8_latency(paths['none'], paths['int8'], runs)
  workdirs.write_json_atomic(os.path.join(directory, 'latency.json'), result)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  modes = [m for m in ('output', 'evaluate', 'latency') if f[m].value]
  if len(modes) != 1:
    raise app.UsageError('Give one of --output (with --workdir), --evaluate or --latency.')
  try:
    if f.output:
      if not f.workdir:
        raise app.UsageError('--output needs --workdir.')
      metadata = export(f.workdir, f.output, f.quantize, f.ema, f.calibration_steps,
                        f.calibration_data, f.int8_io)
      ops, types = ops_and_tensor_types(f.output)
      print(f'Wrote {f.output} ({os.path.getsize(f.output):,} bytes, {metadata["quantize"]}) and '
            f'{metadata_path(f.output)}')
      print(f'ops: {", ".join(sorted(ops))}')
      print(f'tensor types: {", ".join(sorted(types))}')
    elif f.evaluate:
      print(json.dumps(evaluate(f.evaluate, f.config)))
    else:
      result = measure_latency(f.latency, f.threads, f.runs)
      print(f'{result["file"]}: median {result["median_ms"]:.3f} ms (quartiles '
            f'{result["p25_ms"]:.3f}-{result["p75_ms"]:.3f}, min {result["min_ms"]:.3f}, max '
            f'{result["max_ms"]:.3f}) over {result["runs"]} single-image runs, '
            f'{result["threads"]} thread(s), {result["size_bytes"]:,} bytes, on {result["cpu"]}')
      print(json.dumps(result))
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Workdir of main.py or convert.py to export.')
  flags.DEFINE_string('output', None, 'The .tflite file to write (FILE.json goes beside it).')
  flags.DEFINE_string('quantize', 'none', 'none (float32) or int8 (full-integer).')
  flags.DEFINE_bool('ema', False, 'Export the moving averages of the weights.')
  flags.DEFINE_integer('calibration_steps', 10, 'int8: batches of CALIBRATION_BATCH (32) training '
                       'images to calibrate on.')
  flags.DEFINE_string('calibration_data', '', 'int8: a data set string to calibrate on instead '
                      'of the run\'s own (its training split).')
  flags.DEFINE_bool('int8_io', False, 'int8: int8 input and output instead of float.')
  flags.DEFINE_string('evaluate', None, 'Evaluate this .tflite file on the eval split.')
  config_flags.DEFINE_config_file('config', None, '--evaluate: the data set config (default: the '
                                  'exporting run\'s).', lock_config=False)
  flags.DEFINE_string('latency', None, 'Time single-image invocations of this .tflite file.')
  flags.DEFINE_integer('threads', 1, '--latency: interpreter threads (the papers: one core).')
  flags.DEFINE_integer('runs', 100, '--latency: timed invocations after the warm-up.')
  app.run(main, flags_parser=cli.parse_flags)
