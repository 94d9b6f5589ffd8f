"""sweep.py: expansion, names, errors, running, skipping, resuming, failures, collection, plots."""

import csv
import glob
import json
import os
import shlex
import subprocess

import ml_collections
import pytest

from configs import default
import sweep
from tests.helpers import ROOT, run_tool, write_tiny_config_file

PAPER_SWEEPS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'sweeps', '*_paper.py')))


def sweep_config(*groups, overrides=()):
  config = ml_collections.ConfigDict()
  config.groups = [ml_collections.ConfigDict(g) for g in groups]
  config.overrides = overrides
  return config


def test_paper_sweeps_expand_to_the_papers_grids():
  points = {os.path.basename(p): sweep.expand(sweep.load_config(p)) for p in PAPER_SWEEPS}
  v1 = [p.name for p in points['mobilenet_v1_paper.py']]
  assert len(v1) == 16 and v1[0] == 'mobilenet_v1-a1-r224' and v1[-1] == 'mobilenet_v1-a0.25-r128'
  v2 = [p.name for p in points['mobilenet_v2_paper.py']]
  assert len(v2) == 21 and 'mobilenet_v2-a0.35-r96' in v2 and v2[-1] == 'mobilenet_v2-a1.4-r224'
  shuffle = [p.name for p in points['shufflenet_paper.py']]
  assert len(shuffle) == 17 and shuffle[0] == 'shufflenet-g1-a0.25-r224'
  assert shuffle[-2:] == ['shufflenet-g3-a1.5-r224', 'shufflenet-g3-a2-r224']
  for point_list in points.values():
    sweep.check_points(point_list)  # every model builds at its resolution
  point = points['mobilenet_v2_paper.py'][7]
  config = point.config()
  assert (config.model.alpha, config.image_size, config.optimizer) == (0.5, 160, 'rmsprop')


# Each ablation table's sweep: its points are the table's rows, labelled as the paper labels them.
TABLE_SWEEPS = {
    'mobilenet_v1_table4.py': [('Conv MobileNet', 71.7), ('1.0 MobileNet-224', 70.6)],
    'mobilenet_v1_table5.py': [('0.75 MobileNet-224', 68.4), ('Shallow MobileNet', 65.3)],
    'mobilenet_v1_table10.py': [('1.0 MobileNet-224', 83.3), ('0.75 MobileNet-224', 81.9),
                                ('1.0 MobileNet-192', 81.9), ('0.75 MobileNet-192', 80.5),
                                ('Inception V3', 84.0)],
    'mobilenet_v1_comparisons.py': [('1.0 MobileNet-224', 70.6), ('0.50 MobileNet-160', 60.2),
                                    ('SqueezeNet', 57.5), ('GoogleNet', 69.8), ('VGG 16', 71.5),
                                    ('AlexNet', 57.2)],
    'squeezenet_paper.py': [('SqueezeNet', 57.5), ('SqueezeNet + Simple Bypass', 60.4),
                            ('SqueezeNet + Complex Bypass', 58.8), (None, None), ('AlexNet', 57.2)],
    'xception_paper.py': [('Xception', 79.0), ('VGG 16', 71.5), ('ResNet-152', 77.0),
                          ('Inception V3', 78.2)],
    'shufflenet_table4.py': [
        ('VGG-like (140 MFLOPs)', 49.3), ('ResNet (140 MFLOPs)', 62.7),
        ('ResNet (38 MFLOPs)', 51.2), ('ResNet (13 MFLOPs)', 36.3), ('ResNeXt (140 MFLOPs)', 66.7),
        ('ResNeXt (38 MFLOPs)', 54.0), ('ResNeXt (13 MFLOPs)', 34.8),
        ('ShuffleNet 1x (g = 1) = Xception-like', 66.4),
        ('ShuffleNet 0.5x (g = 1) = Xception-like', 54.9),
        ('ShuffleNet 0.25x (g = 1) = Xception-like', 42.9), ('ShuffleNet 1x (g = 8)', 67.6),
        ('ShuffleNet 0.5x (g = 4)', 58.4), ('ShuffleNet 0.25x (g = 8)', 47.3)],
    'mobilenet_v2_figure6.py': [('MobileNetV2', 72.0), ('Relu6 in bottleneck', None),
                                ('Shortcut between expansions', None), ('No residual', None)],
    'shufflenet_table3.py': [
        (f'ShuffleNet {s}x (g = {g}){shuffle}', top1) for g, rows in (
            (3, (('1', 67.4, 65.5), ('0.5', 56.8, 54.3), ('0.25', 45.0, 43.7))),
            (8, (('1', 67.6, 62.4), ('0.5', 57.7, 51.9), ('0.25', 47.3, 43.5))))
        for s, with_shuffle, without in rows
        for shuffle, top1 in (('', with_shuffle), (', no shuffle', without))],
    'shufflenet_table5.py': [
        ('ShuffleNet 2x (g = 3)', 73.7), ('ShuffleNet 1.5x (g = 3)', 71.5),
        ('ShuffleNet 1x (g = 8)', 67.6), ('ShuffleNet 0.5x (g = 4)', 58.4),
        ('ShuffleNet 2x (with SE, g = 3)', 75.3), ('ShuffleNet 0.5x (shallow, g = 3)', 57.2),
        ('1.0 MobileNet-224', 70.6), ('0.75 MobileNet-224', 68.4), ('0.5 MobileNet-224', 63.7),
        ('0.25 MobileNet-224', 50.6)],
}


@pytest.mark.parametrize('name', sorted(TABLE_SWEEPS))
def test_table_sweeps_are_the_papers_rows(name, tmp_path):
  config = sweep.load_config(os.path.join(ROOT, 'configs', 'sweeps', name))
  points = sweep.expand(config)
  sweep.check_points(points)
  assert all('/' not in p.name for p in points)
  sweep.save_plan(points, str(tmp_path), published=tuple(config.get('published', ())))
  rows = sweep.collect(str(tmp_path))
  assert [(r['paper_label'], r['paper_top1']) for r in rows] == TABLE_SWEEPS[name]
  # The papers' rows of networks not built here come last, with the paper's numbers only.
  assert all(r['macs'] is None for r in rows if r['status'] == 'published')
  assert [r['status'] for r in rows] == sorted((r['status'] for r in rows),
                                               key=lambda s: s == 'published')
  assert 'paper top-1 %' in (tmp_path / 'results.md').read_text()


def test_complexity_table_and_published_sources(tmp_path):
  """--complexity_only's table: our MAdds and parameters beside the paper's; a sweep listing a
  source that published.csv lacks is one error naming it."""
  config = sweep.load_config(os.path.join(ROOT, 'configs', 'sweeps', 'squeezenet_paper.py'))
  points = sweep.expand(config)
  sweep.save_plan(points, str(tmp_path), {p.name: {'macs': 832_667_936, 'params': 1_248_424}
                                          for p in points}, published=config.published)
  table = sweep.complexity_table(sweep.collect(str(tmp_path))).splitlines()
  assert table[2] == ('| squeezenet-v1.0-a1-r227-bypass_none | squeezenet | 1 |  | 227 |  | '
                      '832.7 | 1.25 | SqueezeNet | 1700 | 1.25 | 57.5 |')
  assert table[-1] == '|  | alexnet | 1 |  | 227 |  |  |  | AlexNet | 720 | 60.00 | 57.2 |'
  with pytest.raises(ValueError, match="published source 'SqueezeNet Table 9' is not a source"):
    sweep.check_published_sources(('SqueezeNet Table 2', 'SqueezeNet Table 9'))


def test_published_rows_are_unique_and_name_real_settings():
  rows = sweep.read_published()
  keys = [sweep._published_key(r) for r in rows]  # pylint: disable=protected-access
  assert len(keys) == len(set(keys))
  for row in rows:
    for setting in filter(None, row['variant'].split(';')):
      field, _, _ = setting.partition('=')
      assert field in default.ABLATIONS[row['model']], row


def test_seed_summary_gives_mean_and_spread_over_seeds():
  rows = [dict.fromkeys(sweep.COLUMNS) | {'run': f'shufflenet-a1-seed{seed}-shuffle{on}',
                                          'top1': top1}
          for seed, on, top1 in ((0, True, 0.80), (1, True, 0.82), (2, True, 0.84),
                                 (0, False, 0.70), (1, False, 0.70))]
  summary = sweep.seed_summary(rows).splitlines()
  assert summary[-2:] == ['| shufflenet-a1-shuffleTrue | 3 | 82.00 | 2.00 | 80.00 | 84.00 |',
                          '| shufflenet-a1-shuffleFalse | 2 | 70.00 | 0.00 | 70.00 | 70.00 |']
  assert sweep.seed_summary([dict(rows[0], run='shufflenet-a1')]) == ''


def test_zip_pairs_values_and_product_crosses_them():
  axes = (('model.alpha', (0.25, 0.5)), ('image_size', (128, 160)))
  zipped = sweep.expand(sweep_config({'base': 'configs/mobilenet_v1.py', 'mode': 'zip',
                                      'axes': axes}))
  assert [p.name for p in zipped] == ['mobilenet_v1-a0.25-r128', 'mobilenet_v1-a0.5-r160']
  product = sweep.expand(sweep_config({'base': 'configs/mobilenet_v1.py', 'mode': 'product',
                                       'axes': axes}))
  assert len(product) == 4
  # Other varied fields and sweep-wide overrides.
  points = sweep.expand(sweep_config(
      {'base': 'configs/shufflenet.py:groups=8', 'mode': 'product',
       'axes': (('num_epochs', (1.0, 2.0)),)},
      overrides=(('image_size', 160),)))
  assert [p.name for p in points] == ['shufflenet-g8-a1-r160-num_epochs1',
                                      'shufflenet-g8-a1-r160-num_epochs2']
  assert points[1].config().num_epochs == 2.0


@pytest.mark.parametrize('group,message', [
    ({'base': 'configs/mobilenet_v1.py', 'mode': 'zip',
      'axes': (('model.alpha', (0.25, 0.5)), ('image_size', (128,)))}, 'different lengths'),
    ({'base': 'configs/mobilenet_v1.py', 'mode': 'grid', 'axes': (('model.alpha', (0.5,)),)},
     "'product' or 'zip'"),
    ({'base': 'configs/mobilenet_v1.py', 'axes': (('model.width', (0.5,)),)},
     "'model.width' is not a config field"),
    ({'base': 'configs/no_such_model.py', 'axes': (('model.alpha', (0.5,)),)}, 'does not exist'),
    ({'base': 'configs/mobilenet_v1.py', 'axes': (('model.alpha', (0.5, 0.5)),)},
     "Duplicate sweep point 'mobilenet_v1-a0.5-r224'"),
])
def test_bad_sweeps_get_one_clear_error(group, message):
  with pytest.raises(ValueError, match=message):
    sweep.expand(sweep_config(group))


def test_a_model_that_cannot_take_a_resolution_stops_the_sweep_before_training():
  points = sweep.expand(sweep_config({'base': 'configs/mobilenet_v2.py',
                                      'axes': (('image_size', (224, 16)),)}))
  with pytest.raises(ValueError, match='mobilenet_v2-a1-r16: .*image_size=16 is too small'):
    sweep.check_points(points)


def test_a_point_that_ran_with_other_settings_is_refused(tmp_path):
  points = sweep.expand(sweep_config({'base': 'configs/mobilenet_v1.py',
                                      'axes': (('model.alpha', (0.5,)),)}))
  run_dir = tmp_path / points[0].name
  run_dir.mkdir()
  saved = json.loads(points[0].config().to_json_best_effort())
  (run_dir / 'config.json').write_text(json.dumps(saved))
  (run_dir / 'results.json').write_text('{}')
  sweep.check_workdir(points, str(tmp_path))  # same settings: fine
  saved['num_epochs'] = 3.0
  (run_dir / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=r'mobilenet_v1-a0.5-r224 with other settings \(num_epochs\)'):
    sweep.check_workdir(points, str(tmp_path))
  assert (run_dir / 'results.json').read_text() == '{}'  # nothing touched


def _sweep_cli(*args):
  return run_tool('sweep.py', *args, timeout=900)


@pytest.mark.slow
def test_a_bad_sweep_file_is_one_line_on_the_command_line(tmp_path):
  (tmp_path / 'sweep_file.py').write_text('''
import ml_collections

def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({'base': 'configs/mobilenet_v1.py', 'mode': 'product',
                                             'axes': (('model.alpha', (0.5, 0.5)),)})]
  return sweep
''')
  run = _sweep_cli(f'--config={tmp_path / "sweep_file.py"}', f'--workdir={tmp_path / "out"}')
  assert run.returncode != 0 and 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert run.stderr.strip().splitlines()[-1].startswith(
      "error: Duplicate sweep point 'mobilenet_v1-a0.5-r224'")
  bad_dir = _sweep_cli(f'--collect={tmp_path / "nowhere"}')
  assert bad_dir.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path / "nowhere"} has no sweep.json: it is not a sweep directory of sweep.py.')


@pytest.mark.slow
def test_complexity_only_fills_the_table_without_training(tmp_path):
  out = tmp_path / 'v1'
  result = _sweep_cli('--config=configs/sweeps/mobilenet_v1_paper.py', f'--workdir={out}',
                      '--complexity_only')
  assert result.returncode == 0, result.stderr[-2000:]
  with open(out / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows][:2] == ['mobilenet_v1-a1-r224', 'mobilenet_v1-a1-r192']
  assert len(rows) == 16 and {r['status'] for r in rows} == {'pending'}
  by_name = {r['run']: r for r in rows}
  assert round(int(by_name['mobilenet_v1-a1-r224']['macs']) / 1e6, 1) == 568.7
  assert round(int(by_name['mobilenet_v1-a0.5-r160']['macs']) / 1e6, 1) == 76.5
  assert int(by_name['mobilenet_v1-a1-r128']['params']) == 4_231_976
  assert 'mobilenet_v1-a0.25-r224' in (out / 'results.md').read_text()
  assert not any((out / r['run']).exists() for r in rows)  # nothing trained


@pytest.mark.slow
def test_sweep_runs_skips_resumes_reports_failures_and_collects(tmp_path):
  base = write_tiny_config_file(tmp_path / 'tiny.py', num_train_steps=6)
  (tmp_path / 'sweep_file.py').write_text(f'''
import ml_collections

def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      ml_collections.ConfigDict({{'base': {base!r}, 'mode': 'product',
                                  'axes': (('model.alpha', (0.25, 0.5)),)}}),
      ml_collections.ConfigDict({{'base': {base!r}, 'mode': 'product',
                                  'axes': (('dataset', ('no_such_dataset',)),)}}),
  ]
  sweep.overrides = (('image_size', 32),)
  return sweep
''')
  out = tmp_path / 'out'
  args = (f'--config={tmp_path / "sweep_file.py"}', f'--workdir={out}')
  first = _sweep_cli(*args)
  assert first.returncode == 1, first.stderr[-3000:]  # one point failed, the others ran
  done = ['mobilenet_v1-a0.25-r32', 'mobilenet_v1-a0.5-r32']
  failed = 'mobilenet_v1-a0.25-r32-datasetno_such_dataset'
  assert f'{failed}: failed' in first.stdout and 'point(s) failed' in first.stdout
  assert 'no_such_dataset' in (out / failed / 'train.log').read_text()
  with open(out / 'results.csv') as f:
    rows = {r['run']: r for r in csv.DictReader(f)}
  assert list(rows) == done + [failed]
  assert list(next(iter(rows.values()))) == list(sweep.COLUMNS)
  assert [rows[n]['status'] for n in done + [failed]] == ['done', 'done', 'failed']
  for name in done:
    results = json.loads((out / name / 'results.json').read_text())
    assert float(rows[name]['top1']) == results['final_top1']
    assert int(rows[name]['macs']) == results['macs'] > 0
  assert int(rows[done[1]]['macs']) > int(rows[done[0]]['macs'])
  for suffix in ('png', 'svg'):
    assert (out / f'accuracy_vs_madds.{suffix}').stat().st_size > 1000

  # Rerun: finished points are skipped; an interrupted one (checkpoints, no results) resumes.
  mtime = (out / done[0] / 'results.json').stat().st_mtime_ns
  os.remove(out / done[1] / 'results.json')
  second = _sweep_cli(*args)
  assert f'{done[0]}: skipped (done)' in second.stdout
  assert f'{done[1]}: done' in second.stdout
  assert (out / done[0] / 'results.json').stat().st_mtime_ns == mtime
  assert 'Resumed from the checkpoint at step 6' in (out / done[1] / 'train.log').read_text()

  # --collect alone rewrites the table from the directory.
  os.remove(out / 'results.csv')
  assert _sweep_cli(f'--collect={out}').returncode == 0
  assert (out / 'results.csv').exists()


@pytest.mark.slow
def test_dry_run_commands_run_when_copied(tmp_path):
  write_tiny_config_file(tmp_path / 'tiny.py')
  (tmp_path / 'sweep_file.py').write_text(f'''
import ml_collections

def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({{
      'base': {str(tmp_path / "tiny.py")!r}, 'mode': 'zip',
      'axes': (('model.alpha', (0.25,)), ('num_train_steps', (3,)))}})]
  sweep.overrides = ()
  return sweep
''')
  out = tmp_path / 'out'
  result = _sweep_cli(f'--config={tmp_path / "sweep_file.py"}', f'--workdir={out}', '--dry_run')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith('mobilenet_v1-a0.25-r32-num_train_steps3: ')
  assert 'M MAdds' in lines[0]
  command = lines[1].strip()
  assert not (out / 'mobilenet_v1-a0.25-r32-num_train_steps3').exists()
  subprocess.run(command, shell=True, cwd=ROOT, check=True, capture_output=True, timeout=900)
  results = json.loads((out / 'mobilenet_v1-a0.25-r32-num_train_steps3' / 'results.json')
                       .read_text())
  assert results['steps'] == 3 and results['config']['model']['alpha'] == 0.25

  tpu = _sweep_cli(f'--config={tmp_path / "sweep_file.py"}', '--workdir=/mnt/shared/sweep',
                   '--dry_run', '--launch=tpu', '--tpu_name=my-tpu', '--zone=us-central2-b')
  assert tpu.returncode == 0, tpu.stderr[-2000:]
  argv = shlex.split(tpu.stdout.strip().splitlines()[1])
  assert argv[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu',
                      '--zone=us-central2-b', '--worker=all']
  remote = argv[8].removeprefix('--command=')
  assert remote.startswith('cd mobilenets && python3 main.py --config=')
  assert ('--workdir=/mnt/shared/sweep/mobilenet_v1-a0.25-r32-num_train_steps3 --distributed'
          in remote)


@pytest.mark.slow
def test_export_adds_latency_and_int8_columns_once(tmp_path):
  base = write_tiny_config_file(tmp_path / 'tiny.py', num_train_steps=4, ema_decay=0.0)
  (tmp_path / 'sweep_file.py').write_text(f'''
import ml_collections

def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({{'base': {base!r}, 'mode': 'product',
                                              'axes': (('model.alpha', (0.25, 0.5)),)}})]
  sweep.overrides = ()
  return sweep
''')
  out = tmp_path / 'out'
  first = _sweep_cli(f'--config={tmp_path / "sweep_file.py"}', f'--workdir={out}', '--export')
  assert first.returncode == 0, first.stderr[-3000:]
  names = ['mobilenet_v1-a0.25-r32', 'mobilenet_v1-a0.5-r32']
  with open(out / 'results.csv') as f:
    rows = {r['run']: r for r in csv.DictReader(f)}
  for name in names:
    exported = json.loads((out / name / 'export' / 'export.json').read_text())
    assert float(rows[name]['latency_ms']) == exported['latency_ms'] > 0
    assert float(rows[name]['int8_latency_ms']) == exported['int8_latency_ms'] > 0
    assert 0 <= float(rows[name]['int8_top1']) <= 1
    assert int(rows[name]['int8_tflite_bytes']) == os.path.getsize(
        out / name / 'export' / 'model_int8.tflite')
  assert 'int8 top-1 %' in (out / 'results.md').read_text()
  assert (out / 'accuracy_vs_latency.png').stat().st_size > 1000
  # Exported points are not exported again.
  mtime = (out / names[0] / 'export' / 'model.tflite').stat().st_mtime_ns
  again = _sweep_cli(f'--collect={out}', '--export')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'exporting' not in again.stdout
  assert (out / names[0] / 'export' / 'model.tflite').stat().st_mtime_ns == mtime


def test_a_plan_of_an_earlier_version_is_one_clear_error(tmp_path):
  """A sweep.json whose points lack a field of today's identity (one written before `variant`
  existed) is refused, not completed by rebuilding the points from their configs."""
  point = {'name': 'mobilenet_v1-a0.25-r32', 'base': 'configs/quickstart.py', 'overrides': [],
           'identity': {'dataset': 'fashion_mnist', 'model': 'mobilenet_v1', 'alpha': 0.25,
                        'groups': None, 'image_size': 32}}
  (tmp_path / 'sweep.json').write_text(json.dumps({'points': [point]}))
  with pytest.raises(ValueError, match='written by an earlier version of sweep.py: run the sweep in a new --workdir'):
    sweep.collect(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['sweep.json']


def test_latency_only_times_untrained_exports_without_training(tmp_path, capsys):
  """--latency_only: float and int8 LiteRT files of untrained weights, timed, in DIR/latency/;
  the table and latency_vs_madds plot get them; nothing trains and a rerun skips timed points."""
  import export  # pylint: disable=g-import-not-at-top
  points = sweep.expand(sweep_config({'base': 'configs/mobilenet_v1.py:alpha=0.25,res=32',
                                      'mode': 'product', 'axes': (('model.alpha', (0.25,)),)}))
  sweep.save_plan(points, str(tmp_path), {points[0].name: {'macs': 1, 'params': 1}})
  sweep.untrained_latencies(points, str(tmp_path), runs=2)
  directory = tmp_path / 'latency' / points[0].name
  timed = json.loads((directory / 'latency.json').read_text())
  assert timed['latency_ms'] > 0 and timed['int8_latency_ms'] > 0 and timed['runs'] == 2
  assert 'int8' in export.ops_and_tensor_types(str(directory / 'model_int8.tflite'))[1]
  [row] = sweep.collect(str(tmp_path))
  assert row['latency_ms'] == timed['latency_ms'] and row['top1'] is None
  assert row['status'] == 'pending' and not (tmp_path / points[0].name).exists()
  assert (tmp_path / 'latency_vs_madds.png').stat().st_size > 1000
  assert 'int8 latency ms' in sweep.complexity_table([row])
  sweep.untrained_latencies(points, str(tmp_path), runs=2)
  assert 'skipped (timed)' in capsys.readouterr().out
