"""export.py: LiteRT files that compute our networks, int8 quantization, evaluation, latency,
predict.py on an exported file, and bad input."""

import json
import os

import numpy as np
import pytest

import convert
import export
import input_pipeline
import models
import predict
import train
import workdirs
from configs import mobilenet_v1, mobilenet_v2, shufflenet
from tests.helpers import random_variables, run_tool, tiny_config


def _write_workdir(path, config):
  """A train-free checkpoint of `config`'s network with random weights, written as convert.py
  writes its workdirs."""
  variables = random_variables(models.get_model(config), config.image_size,
                               random_batchnorm=True)
  convert.write_workdir(str(path), config, variables, {'format': 'test'})
  return variables


NETWORKS = {
    'mobilenet_v1': lambda: mobilenet_v1.get_config('alpha=0.25,res=48'),
    'mobilenet_v2': lambda: mobilenet_v2.get_config('alpha=0.35,res=32'),
    'shufflenet_g3': lambda: shufflenet.get_config('groups=3,scale=0.25,res=64'),
    'shufflenet_g8': lambda: shufflenet.get_config('groups=8,scale=0.25,res=32'),
}


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_float_file_computes_the_jax_logits(name, tmp_path):
  config = NETWORKS[name]()
  config.num_classes = 10
  variables = _write_workdir(tmp_path / 'run', config)
  output = str(tmp_path / 'model.tflite')
  metadata = export.export(str(tmp_path / 'run'), output)
  assert metadata['image_size'] == config.image_size
  assert metadata['normalization_mean'] == list(config.normalization_mean)
  images = np.random.default_rng(1).normal(size=(4, config.image_size, config.image_size, 3))
  images = images.astype(np.float32)
  expected = np.asarray(models.get_model(config).apply(variables, images, train=False))
  actual = export.Runner(output).logits(images)
  assert np.abs(actual - expected).max() < 1e-4 * np.abs(expected).max()
  ops, _ = export.ops_and_tensor_types(output)
  assert 'CONV_2D' in ops and 'DEPTHWISE_CONV_2D' in ops
  assert not {op for op in ops if 'BATCH' in op or 'STABLEHLO' in op or op == 'CUSTOM'}
  if name.startswith('shufflenet'):
    assert {'TRANSPOSE', 'AVERAGE_POOL_2D', 'CONCATENATION'} <= ops  # shuffle, stride-2 units


# The tiny trained run of the tests below.
TRAINED = dict(num_train_steps=24, ema_decay=0.0, synthetic_train_examples=256,
               synthetic_eval_examples=60, eval_every_steps=-1)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny trained run (MobileNet V1 0.25, 32 px, synthetic data of 4 classes)."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  return workdir, train.train_and_evaluate(tiny_config(**TRAINED), workdir)


def test_int8_file_is_integer_and_agrees_with_float(trained, tmp_path):
  workdir, _ = trained
  float_path, int8_path = str(tmp_path / 'f.tflite'), str(tmp_path / 'q.tflite')
  export.export(workdir, float_path)
  metadata = export.export(workdir, int8_path, quantize='int8', calibration_steps=2)
  assert metadata['calibration'] == {'images': 64, 'dataset': 'synthetic'}
  ops, types = export.ops_and_tensor_types(int8_path)
  assert 'int8' in types and not {op for op in ops if 'BATCH' in op}
  # The weights of every convolution and of the classifier are int8 in the file.
  from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top
  tensors = litert.Interpreter(model_path=int8_path).get_tensor_details()
  kernels = [t for t in tensors if len(t['shape']) == 4 and t['shape'][0] > 1
             and 'conv' in t['name'].lower() and t['name'] != 'image']
  assert kernels and all(t['dtype'] == np.int8 for t in kernels)
  # On the run's evaluation images (the distribution the int8 ranges were calibrated on).
  config = tiny_config(**TRAINED)
  images = np.concatenate([
      np.asarray(b['image']).reshape(-1, 32, 32, 3)[np.asarray(b['mask']).reshape(-1) == 1]
      for b in input_pipeline.eval_batches(input_pipeline.load(config), config)])
  assert len(images) == 60
  float_top1 = export.Runner(float_path).logits(images).argmax(-1)
  int8_top1 = export.Runner(int8_path).logits(images).argmax(-1)
  assert (float_top1 == int8_top1).mean() >= 0.8
  assert os.path.getsize(int8_path) < os.path.getsize(float_path)


def test_evaluate_counts_every_example_once_and_matches_jax(trained, tmp_path):
  workdir, results = trained
  output = str(tmp_path / 'model.tflite')
  export.export(workdir, output)
  evaluated = export.evaluate(output)
  assert evaluated['count'] == results['eval_count'] == 60
  assert evaluated['top1'] == pytest.approx(results['final_top1'], abs=1 / 60 + 1e-9)


def test_int8_io_and_latency_and_evaluate_on_the_command_line(trained, tmp_path):
  workdir, _ = trained
  output = str(tmp_path / 'q.tflite')
  run = run_tool('export.py', f'--workdir={workdir}', f'--output={output}', '--quantize=int8',
                 '--int8_io', '--calibration_steps=1', timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'ops: ' in run.stdout and 'int8' in run.stdout.splitlines()[-1]
  runner = export.Runner(output)
  assert runner.input['dtype'] == np.int8 and runner.output['dtype'] == np.int8
  bench = run_tool('export.py', f'--latency={output}', '--runs=5', timeout=600)
  assert bench.returncode == 0, bench.stderr[-2000:]
  result = json.loads(bench.stdout.splitlines()[-1])
  assert result['runs'] == 5 and result['threads'] == 1 and result['cpu']
  assert 0 < result['min_ms'] <= result['median_ms'] <= result['max_ms']
  assert 'median' in bench.stdout and result['size_bytes'] == os.path.getsize(output)
  evaluated = run_tool('export.py', f'--evaluate={output}', timeout=600)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert json.loads(evaluated.stdout.splitlines()[-1])['count'] == 60


def test_predict_gives_the_same_top1_on_the_file_as_on_the_workdir(trained, tmp_path):
  workdir, _ = trained
  output = str(tmp_path / 'model.tflite')
  export.export(workdir, output)
  rng = np.random.default_rng(3)
  paths = []
  for i in range(4):
    path = str(tmp_path / f'{i}.png')
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  on_workdir = predict.predict(workdir, paths, top_k=2)
  on_file = predict.predict('', paths, top_k=2, tflite=output)
  for a, b in zip(on_workdir, on_file):
    assert a['top'][0]['label'] == b['top'][0]['label']
    assert a['top'][0]['probability'] == pytest.approx(b['top'][0]['probability'], abs=1e-4)


def test_bad_input_is_one_clear_error_and_leaves_no_file(trained, tmp_path):
  workdir, _ = trained
  output = tmp_path / 'out.tflite'
  def cli(*args):
    return run_tool('export.py', *args, timeout=600)
  empty = tmp_path / 'empty'  # a workdir with its config.json and no checkpoint
  empty.mkdir()
  (empty / 'config.json').write_text(json.dumps(workdirs.config_as_dict(tiny_config())))
  cases = [
      ((f'--workdir={empty}', f'--output={output}'), 'error: No checkpoint in'),
      ((f'--workdir={workdir}', f'--output={output}', '--quantize=int4'),
       "error: --quantize must be one of none, int8, got 'int4'."),
      ((f'--workdir={workdir}', f'--output={output}', '--quantize=int8',
        '--calibration_data=folder:/no/such/dir'), 'error: '),
      ((f'--latency={tmp_path / "not.tflite"}',), 'does not exist'),
  ]
  (tmp_path / 'fake.tflite').write_text('not a flatbuffer at all')
  cases.append(((f'--evaluate={tmp_path / "fake.tflite"}',),
                'is not a LiteRT (TFLite) file: export one with export.py.'))
  for args, message in cases:
    run = cli(*args)
    assert run.returncode != 0 and message in run.stderr.strip().splitlines()[-1], run.stderr[-1500:]
  assert not output.exists() and not (tmp_path / 'out.json').exists()
  assert sorted(os.listdir(tmp_path)) == ['empty', 'fake.tflite']  # no temporary file left


def test_a_graph_xnnpack_refuses_runs_on_the_builtin_kernels(tmp_path, monkeypatch, caplog):
  """Where XNNPACK cannot prepare a file (it refused int8 files with a tensor scale of 1e36), the
  Runner says so in one warning line, runs LiteRT's builtin kernels, gives the same logits, and
  the latency records which runtime timed it."""
  from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  directory = tmp_path / 'untrained'
  export.untrained_latency(config, str(directory), runs=2)
  path = str(directory / 'model_int8.tflite')
  image = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
  expected = export.Runner(path).invoke(image)
  real = litert.Interpreter
  def refusing(*args, **kwargs):
    interpreter = real(*args, **kwargs)
    if 'experimental_op_resolver_type' not in kwargs:
      def fail():
        raise RuntimeError('failed to create XNNPACK runtimeNode number 9 (TfLiteXNNPackDelegate) '
                           'failed to prepare.')
      interpreter.allocate_tensors = fail
    return interpreter
  monkeypatch.setattr(litert, 'Interpreter', refusing)
  with caplog.at_level('WARNING'):
    runner = export.Runner(path)
  assert runner.runtime == 'builtin kernels'
  assert [r.getMessage().count('XNNPACK refused') for r in caplog.records] == [1]
  np.testing.assert_allclose(runner.invoke(image), expected, rtol=0,
                             atol=0.05 * np.abs(expected).max())
  assert export.measure_latency(path, runs=2)['runtime'] == 'builtin kernels'
