r"""Published weights to a workdir of ours, and our checkpoints back to Keras.

    python convert.py --format=tf_slim --source=mobilenet_v1_1.0_224.ckpt \
        --config=configs/mobilenet_v1.py --workdir=runs/slim_v1_1.0_224
    python convert.py --format=keras --source=mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5 \
        --config=configs/mobilenet_v2.py --workdir=runs/keras_v2_1.0_224
    python convert.py --format=pytorchcv --source=shufflenet_g3_w1-xxxx.pth \
        --config=configs/shufflenet.py:groups=3 --workdir=runs/pytorchcv_g3
    python convert.py --format=pytorchcv --source=squeezenet_v1_1-xxxx.pth \
        --config=configs/squeezenet.py:version=1.1 --workdir=runs/pytorchcv_squeezenet_1.1
    python convert.py --format=keras --source=xception_weights_tf_dim_ordering_tf_kernels.h5 \
        --config=configs/xception.py --workdir=runs/keras_xception
    python convert.py --to_keras=model.weights.h5 --workdir=runs/v2_0.5   # ours -> Keras

An import writes `workdir/config.json` (the --config with the settings the weights need: input
normalization, BatchNorm epsilon, class count and offset, ShuffleNet's concatenation order) and an
Orbax checkpoint at step 0, the format train.py writes. Evaluate it with
`main.py --workdir=DIR --config=... --config.eval_only=True`, fine-tune from it with
`--config.init_from=DIR`, or classify images with `predict.py --workdir=DIR`. Nothing is written
unless every tensor converts; an existing workdir is never touched.
"""

import os
import shutil

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

import cli
from configs import default
import weight_formats
import models
import optimizers
import workdirs

FLAGS = flags.FLAGS


def converted_config(fmt: str, config: ml_collections.ConfigDict,
                     source: dict) -> ml_collections.ConfigDict:
  """`config` with what weights of format `fmt` need; the class count comes from the weights'
  classifier where the format names it (1001 TF-slim classes: label_offset 1)."""
  settings = dict(weight_formats.FORMAT_SETTINGS[fmt])
  if config.model.name != 'shufflenet':
    settings.pop('model.shortcut_first', None)
  head = weight_formats.LAYER_NAMES[fmt, weight_formats.network(config)][1]
  bias = source.get(head + weight_formats.FORMATS[fmt].sep + weight_formats.FORMATS[fmt].dense['bias'])
  if bias is not None and fmt != 'keras':
    settings['num_classes'] = int(bias.shape[0])
    settings['label_offset'] = 1 if fmt == 'tf_slim' and bias.shape[0] == 1001 else 0
  return workdirs.with_settings(config, settings)


def check_main_network(config: ml_collections.ConfigDict, fmt: str) -> None:
  """ValueError for an ablation variant that format `fmt` does not publish: the published weights
  and the Keras applications are the papers' main networks (and pytorchcv's SqueezeNets
  v1.1 and with simple bypass, weight_formats.FORMAT_VARIANTS)."""
  published = weight_formats.FORMAT_VARIANTS.get((fmt, config.model.name), {})
  changed = {field: value for field, value in default.changed_ablations(config.model).items()
             if value not in published.get(field, ())}
  if changed:
    field, value = next(iter(changed.items()))
    raise ValueError(f'model.{field}={value!r} builds an ablation variant, and the weight '
                     f'formats hold only the papers\' main networks: leave model.{field} at '
                     f'{default.ABLATIONS[config.model.name][field]!r}.')


def write_workdir(workdir: str, config: ml_collections.ConfigDict, variables: dict,
                  provenance: dict) -> None:
  """Writes config.json, a step-0 TrainState checkpoint and converted.json into a new workdir,
  built next to it and renamed into place when complete."""
  tx = optimizers.create_optimizer(config, optimizers.create_schedule(config, 1, 1))
  state = workdirs.new_train_state(models.get_model(config).apply, variables, tx,
                                   keep_ema=config.ema_decay > 0)
  partial = os.path.abspath(workdir.rstrip('/') + '.partial')
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  workdirs.write_config(partial, config, changes={}, step=0)
  workdirs.write_json_atomic(os.path.join(partial, 'converted.json'), provenance)
  manager = workdirs.checkpoint_manager(partial)
  workdirs.save_train_state(manager, 0, state)
  manager.wait_until_finished()
  os.rename(partial, workdir)


def import_weights(fmt: str, source_path: str, config: ml_collections.ConfigDict,
                   workdir: str) -> ml_collections.ConfigDict:
  """Converts the weights file `source_path` into a new workdir; returns its config."""
  weight_formats.supported(fmt, weight_formats.network(config))
  check_main_network(config, fmt)
  if not workdirs.is_local(workdir):
    raise ValueError(f'--workdir={workdir}: convert into a local directory (it is built next to '
                     'its final place and renamed, which object storage cannot do), then copy it '
                     '(gcloud storage cp -r DIR gs://...).')
  if os.path.exists(workdir) and os.listdir(workdir):
    raise ValueError(f'{workdir} exists and is not empty; give a new --workdir.')
  if not os.path.exists(source_path) and not os.path.exists(source_path + '.index'):
    raise ValueError(f'--source={source_path} does not exist.')
  source = weight_formats.read(fmt, source_path, config)
  config = converted_config(fmt, config, source)
  variables = weight_formats.import_variables(fmt, weight_formats.network(config), source,
                                          models.variable_shapes(config))
  if os.path.isdir(workdir):
    os.rmdir(workdir)
  write_workdir(workdir, config, variables,
                {'format': fmt, 'source': os.path.abspath(source_path)})
  return config


def write_keras(workdir: str, target: str, ema: bool = False) -> None:
  """Writes the latest checkpoint of `workdir` as Keras applications weights (`.weights.h5`).

  Keras' BatchNorm epsilon is 1e-3; a model trained with another epsilon gets its variances
  shifted by the difference, so the Keras network computes the same function."""
  if not target.endswith('.weights.h5'):
    raise ValueError(f'--to_keras={target}: Keras weight files end in .weights.h5.')
  config, variables = workdirs.load_for_inference(workdir, ema)
  weight_formats.supported('keras', weight_formats.network(config))
  check_main_network(config, 'keras')
  variables = weight_formats.fold_bn_epsilon(variables, config.model.bn_epsilon, 1e-3)
  model = weight_formats.keras_application(config)
  shapes = {name: value.shape for name, value in weight_formats.keras_weights(model).items()}
  values = weight_formats.published_variables('keras', weight_formats.network(config), variables,
                                              shapes)
  weight_formats.set_keras_weights(model, values)
  model.save_weights(target)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    if FLAGS.to_keras:
      write_keras(FLAGS.workdir, FLAGS.to_keras, FLAGS.ema)
      print(f'Wrote {FLAGS.to_keras}.')
      return
    if not (FLAGS.format and FLAGS.source and FLAGS.config):
      raise ValueError('An import needs --format, --source and --config (or give --to_keras).')
    config = import_weights(FLAGS.format, FLAGS.source, FLAGS.config, FLAGS.workdir)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  print(f'Wrote {FLAGS.workdir}: {config.model.name} alpha={config.model.alpha}, '
        f'{config.num_classes} classes (label_offset {config.label_offset}).')


if __name__ == '__main__':
  flags.DEFINE_enum('format', None, list(weight_formats.FORMATS), 'Format of --source.')
  flags.DEFINE_string('source', None, 'Weights file (TF checkpoint prefix, .h5 or .pth).')
  config_flags.DEFINE_config_file('config', None, 'Config of the network the weights are for.')
  flags.DEFINE_string('workdir', None, 'New workdir to write (import) or workdir to read (--to_keras).')
  flags.DEFINE_string('to_keras', None, 'Write the latest checkpoint of --workdir to this Keras '
                      '.weights.h5 file instead of importing.')
  flags.DEFINE_bool('ema', False, 'Export the moving averages of the weights.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main, flags_parser=cli.parse_flags)
