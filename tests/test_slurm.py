"""sweep.py --launch=slurm against a real single-node Slurm started for these tests
(tools/single_node_slurm.py; setup.sh installs Debian's packages): a throttled job array gives the
local sweep's results, a rerun while it runs submits nothing twice, a point signalled after a
checkpoint is requeued and ends bit-identical, a 2-task point is one 2-process JAX run (also when
signalled), and bad launches are one line before anything is submitted."""

import csv
import json
import os
import re
import subprocess
import sys
import time

import flax
import numpy as np
import pytest

import slurm_launch
from tools import single_node_slurm
from tests.helpers import ROOT, run_tool, train_command, write_tiny_config_file
from tests import test_multiprocess
from tests.test_multiprocess import train_losses
import workdirs

pytestmark = pytest.mark.slow

WHY_NOT = single_node_slurm.missing()
needs_slurm = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)


@pytest.fixture(scope='session')
def slurm(tmp_path_factory):
  """A running single-node Slurm (one per test process); stopped after the tests."""
  cluster = single_node_slurm.SingleNodeSlurm(tmp_path_factory.mktemp('slurm'))
  cluster.start()
  yield cluster
  cluster.stop()


def write_sweep_file(path, base: str, axes: str) -> str:
  path.write_text(f'''
import ml_collections

def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({{'base': {base!r}, 'mode': 'product',
                                              'axes': {axes}}})]
  sweep.overrides = ()
  return sweep
''')
  return str(path)


def sweep_cli(env, *args, **kwargs):
  return run_tool('sweep.py', *args, env=env, timeout=900, **kwargs)


def wait_for(condition, timeout: float, what: str):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.1)


def flat_params(run_dir, step=None) -> dict:
  return flax.traverse_util.flatten_dict(
      workdirs.restore_on_host(str(run_dir), step=step)[0]['params'], sep='/')


def assert_same_params(run_dir, reference):
  ours, theirs = flat_params(run_dir), flat_params(reference)
  assert ours.keys() == theirs.keys()
  assert all(np.array_equal(ours[k], theirs[k]) for k in ours), 'parameters differ'


def signal_after_checkpoint(slurm, sweep_dir, point: str, step: int) -> None:
  """SIGTERM (`scancel --signal=TERM`) to the job of `point` once its checkpoint of `step` is
  written. (Slurm 22.05 answers a signal to an array task while other tasks of its array are
  pending with "try again later" after delivering it, and scancel repeats it: signal a task
  whose array has none pending.)"""
  wait_for(lambda: os.path.isdir(f'{sweep_dir}/{point}/checkpoints/{step}'), 600,
           f'the checkpoint of step {step} of {point}')
  job = slurm_launch.read_records(str(sweep_dir))[point]
  result = slurm.run('scancel', '--signal=TERM', job)
  assert result.returncode == 0, result.stderr


def stopped_and_resumed_at(log: str) -> int:
  """The step at which a run logged that a signal stopped it, which must be the step it resumed
  from."""
  stopped = re.findall(r'Stopped by a signal after step (\d+)', log)
  resumed = re.findall(r'Resumed from the checkpoint at step (\d+)', log)
  assert len(stopped) == 1 and resumed == stopped, (stopped, resumed)
  return int(stopped[0])


@needs_slurm
def test_a_throttled_array_gives_the_local_results_and_a_signalled_point_resumes_exactly(
    slurm, tmp_path):
  """4 points (seeds: one compilation for all) and a failing one with --max_parallel=2: a rerun
  while the points are queued or running submits nothing, never more than 2 run at once, the
  last seed, signalled after its checkpoint of step 20, is requeued and resumes, the failing
  point is reported while the others finish with the metrics and parameters of the same sweep
  run here one point after another, and the next rerun submits the failed point only."""
  base = write_tiny_config_file(tmp_path / 'tiny.py', num_train_steps=60, log_every_steps=10,
                                checkpoint_every_steps=20, eval_every_steps=60)
  sweep_file = tmp_path / 'seeds.py'
  sweep_file.write_text(f'''
import ml_collections

def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [
      ml_collections.ConfigDict({{'base': {base!r}, 'axes': (('seed', (0, 1, 2, 3)),)}}),
      ml_collections.ConfigDict({{'base': {base!r}, 'axes': (('dataset', ('no_such_dataset',)),)}}),
  ]
  sweep.overrides = ()
  return sweep
''')
  names = [f'mobilenet_v1-a0.25-r32-seed{seed}' for seed in range(4)]
  failing = 'mobilenet_v1-a0.25-r32-datasetno_such_dataset'
  local_dir, slurm_dir = tmp_path / 'local', tmp_path / 'slurm'
  env = dict(slurm.env, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  local = subprocess.Popen([sys.executable, 'sweep.py', f'--config={sweep_file}',
                            f'--workdir={local_dir}'], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  args = (f'--config={sweep_file}', f'--workdir={slurm_dir}', '--launch=slurm',
          '--max_parallel=2')
  first = sweep_cli(env, *args)
  assert first.returncode == 0, first.stderr[-3000:]
  jobs = slurm_launch.read_records(str(slurm_dir))
  assert sorted(jobs) == sorted(names + [failing])
  assert len({job.split('_')[0] for job in jobs.values()}) == 1  # one array
  for name in names + [failing]:
    assert f'{name}: submitted as job {jobs[name]}' in first.stdout

  again = sweep_cli(env, *args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'submitted as job' not in again.stdout
  for name in names + [failing]:  # a first point may have finished meanwhile
    assert re.search(f'{name}: ((queued|running) as job {jobs[name]}, not submitted again|'
                     r'skipped \(done\))', again.stdout), again.stdout
  assert f'{failing}: queued' in again.stdout  # the 5th point waits for 3 others
  assert slurm_launch.read_records(str(slurm_dir)) == jobs

  signal_after_checkpoint(slurm, slurm_dir, names[3], 20)
  waited = sweep_cli(env, *args, '--wait')
  assert waited.returncode == 1, waited.stdout[-3000:] + waited.stderr[-3000:]
  # Under load the failing point can have run and failed before this command (the third seed
  # finished before the fourth reached its checkpoint): the rerun then submits it again, as it
  # does every failed point. Nothing else is submitted.
  assert re.findall(r'(\S+): submitted as job', waited.stdout) in ([], [failing]), waited.stdout
  assert f'1 point(s) did not finish: {failing}; rerun the same command' in waited.stdout
  running = {n for n in jobs if re.search(f'{n}: running as job', again.stdout)}
  most = len(running)
  for line in waited.stdout.splitlines():
    name, _, state = line.partition(': ')
    if name in jobs:
      running.discard(name)
      if state == 'running':
        running.add(name)
      most = max(most, len(running))
  assert most == 2, waited.stdout  # two at a time, as asked, and never more

  log = (slurm_dir / names[3] / 'train.log').read_text()
  assert 20 <= stopped_and_resumed_at(log) < 60, log[-3000:]
  assert 'requeue' in ''.join(p.read_text() for p in (slurm_dir / 'slurm').glob('*/*_log.out'))
  assert 'no_such_dataset' in (slurm_dir / failing / 'train.log').read_text()
  assert (slurm_dir / failing / 'FAILED').exists()

  assert local.wait(timeout=900) == 1, local.stdout.read()[-3000:]
  tables = []
  for directory in (local_dir, slurm_dir):
    with open(directory / 'results.csv') as f:
      tables.append({r['run']: r for r in csv.DictReader(f)})
  metrics = ('status', 'macs', 'params', 'top1', 'top5', 'ema_top1')
  for name in names + [failing]:
    assert [tables[1][name][m] for m in metrics] == [tables[0][name][m] for m in metrics]
  assert [tables[1][name]['status'] for name in names + [failing]] == ['done'] * 4 + ['failed']
  for name in names:
    assert train_losses(slurm_dir / name) == train_losses(local_dir / name)
  assert_same_params(slurm_dir / names[3], local_dir / names[3])

  retry = sweep_cli(env, *args)
  assert retry.returncode == 0, retry.stderr[-3000:]
  assert [line.partition(': ')[2].partition(' as job')[0] for line in retry.stdout.splitlines()
          if line.partition(': ')[0] in jobs] == ['skipped (done)'] * 4 + ['submitted']
  slurm.run('scancel', slurm_launch.read_records(str(slurm_dir))[failing])


@needs_slurm
def test_a_two_task_point_is_one_run_and_a_signal_saves_one_step_that_both_resume(
    slurm, tmp_path):
  """A point of 2 tasks x 2 CPU devices under srun, signalled after its first checkpoint: both
  processes stop at the same step (JAX's preemption sync point), the array task is requeued and
  resumes; the run then equals a 2-process run started directly, bit for bit, and 1 process x 4
  devices to the multi-process tests' bounds over the steps before chaos (steps 1 and 2)."""
  settings = dict(test_multiprocess.EQUIVALENCE, num_train_steps=12, eval_every_steps=12,
                  keep_checkpoints=12)
  base = write_tiny_config_file(tmp_path / 'tiny.py', **settings)
  sweep_file = write_sweep_file(tmp_path / 'one.py', base, "(('model.alpha', (0.25,)),)")
  sweep_dir = tmp_path / 'sweep'
  run_dir = sweep_dir / 'mobilenet_v1-a0.25-r32'
  two_devices = dict(slurm.env, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  submitted = sweep_cli(two_devices, f'--config={sweep_file}', f'--workdir={sweep_dir}',
                        '--launch=slurm', '--slurm_tasks_per_node=2')
  assert submitted.returncode == 0, submitted.stderr[-3000:]
  signal_after_checkpoint(slurm, sweep_dir, run_dir.name, 1)
  # The references run while the point waits to be started again, and after.
  references = {n: str(tmp_path / f'direct_{n}') for n in (2, 1)}
  for n, workdir in references.items():
    test_multiprocess.wait_ok(test_multiprocess.launch(workdir, n, **settings), workdir)
  job = slurm_launch.read_records(str(sweep_dir))[run_dir.name]
  wait_for(lambda: not slurm.run('squeue', '--noheader', f'--jobs={job}').stdout.strip(), 600,
           'the point to leave the queue')

  logs = [(run_dir / name).read_text() for name in ('train.log', 'train.task1.log')]
  assert 'JAX process 0 of 2, 2 local devices of 4' in logs[0]
  assert 'JAX process 1 of 2, 2 local devices of 4' in logs[1]
  steps = [stopped_and_resumed_at(log) for log in logs]
  assert steps[0] == steps[1] and 1 <= steps[0] < 12, steps
  assert json.loads((run_dir / 'results.json').read_text())['steps'] == 12

  assert train_losses(run_dir) == train_losses(references[2])
  assert_same_params(run_dir, references[2])
  losses, expected = train_losses(run_dir), train_losses(references[1])
  for step in (1, 2):
    assert abs(losses[step] - expected[step]) <= 1e-5 * abs(expected[step])
  initial = test_multiprocess.initial_params()
  params, ref_params = flat_params(run_dir, step=1), flat_params(references[1], step=1)
  moved = max(np.abs(ref_params[k] - initial[k]).max() for k in ref_params)
  differ = max(np.abs(params[k] - ref_params[k]).max() for k in ref_params)
  assert moved > 1e-2 and differ <= 1e-4 * moved, (differ, moved)


@needs_slurm
def test_a_coordinator_whose_slurm_peers_never_start_names_them_after_the_timeout(slurm, tmp_path):
  """srun starts 2 tasks, only task 0 runs main.py --distributed (settings from Slurm's
  environment): one line naming process 1 and what to check, not JAX's abort."""
  command = ' '.join(train_command(tmp_path / 'run')) + ' --distributed --initialization_timeout=6'
  result = slurm.run('srun', '--ntasks=2', '--chdir', ROOT, 'bash', '-c',
                     f'if [ "$SLURM_PROCID" = 0 ]; then {command}; fi')
  lines = result.stderr.strip().splitlines()
  assert result.returncode != 0
  assert re.fullmatch(
      r'error: Process\(es\) 1 of 2 did not join the run coordinated here at \S+:\d+ within 6 s: '
      r"check that Slurm started every task of the step \(srun, --ntasks; the tasks' logs\) and "
      r'that no other job uses the port, and check that port \d+ of this host is reachable from '
      r'theirs \(--initialization_timeout\)\.', [l for l in lines if l.startswith('error')][0]), (
          result.stderr[-3000:])
  assert 'Traceback' not in result.stderr and 'Abort' not in result.stderr
  assert not (tmp_path / 'run').exists()


@needs_slurm
def test_bad_slurm_launches_are_one_line_before_anything_is_submitted(slurm, tmp_path,
                                                                      monkeypatch):
  resources = slurm_launch.Resources()
  monkeypatch.setenv('SLURM_CONF', slurm.conf)
  with pytest.raises(ValueError, match=r"^Slurm has no partition 'gpu' \(it has debug\): check "
                     r'--slurm_partition\.$'):
    slurm_launch.check_cluster(slurm_launch.Resources(partition='gpu'), str(tmp_path))
  with pytest.raises(ValueError, match=r'^--workdir=/dev/shm/sweep is on a tmpfs, in this '
                     r"machine's memory: the compute nodes cannot reach it"):
    slurm_launch.check_cluster(resources, '/dev/shm/sweep')
  with pytest.raises(ValueError, match=r'must be a directory on a file system the compute nodes '
                     'share'):
    slurm_launch.check_cluster(resources, 'gs://bucket/sweep')
  monkeypatch.setenv('PATH', os.path.dirname(sys.executable))
  with pytest.raises(ValueError, match=r'^sbatch, squeue, sinfo, scontrol not found: '
                     '--launch=slurm runs where'):
    slurm_launch.check_cluster(resources, str(tmp_path))

  base = write_tiny_config_file(tmp_path / 'tiny.py')
  sweep_file = write_sweep_file(tmp_path / 'one.py', base, "(('model.alpha', (0.25,)),)")
  result = sweep_cli(slurm.env, f'--config={sweep_file}', f'--workdir={tmp_path / "out"}',
                     '--launch=slurm', '--slurm_partition=gpu')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "error: Slurm has no partition 'gpu' (it has debug): check --slurm_partition."]
  assert not (tmp_path / 'out' / 'slurm').exists()
  assert slurm.run('squeue', '--noheader').stdout == ''
  refused = sweep_cli(slurm.env, f'--config={sweep_file}', f'--workdir={tmp_path / "out"}',
                      '--launch=slurm', '--slurm_option=bogus=1')
  assert refused.returncode == 1
  assert refused.stderr.strip().splitlines()[-1] == (
      "error: sbatch refused the job array (sbatch: unrecognized option '--bogus=1'): check the "
      '--slurm_* settings.')
  assert not (tmp_path / 'out' / 'slurm' / 'jobs.json').exists()
  assert slurm.run('squeue', '--noheader').stdout == ''


def test_a_slurm_dry_run_shows_the_array_and_each_task_s_command(tmp_path):
  """Without Slurm on the machine: the sbatch file submitit would write (the array throttled to
  --max_parallel, the resources, SIGTERM before the time limit, requeue) and each point's
  command, with --distributed for points of several tasks."""
  base = write_tiny_config_file(tmp_path / 'tiny.py')
  sweep_file = write_sweep_file(tmp_path / 'two.py', base, "(('model.alpha', (0.25, 0.5)),)")
  result = sweep_cli(dict(os.environ, PATH=os.path.dirname(sys.executable)),
                     f'--config={sweep_file}', f'--workdir={tmp_path / "out"}', '--launch=slurm',
                     '--dry_run', '--max_parallel=1', '--slurm_nodes=2',
                     '--slurm_gpus_per_node=8', '--slurm_partition=a100', '--slurm_time=600',
                     '--slurm_option=constraint=80gb', '--slurm_setup=module load cuda')
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  for line in ('#SBATCH --array=0-1%1', '#SBATCH --nodes=2', '#SBATCH --gpus-per-node=8',
               '#SBATCH --partition=a100', '#SBATCH --time=600', '#SBATCH --signal=TERM@120',
               '#SBATCH --requeue', '#SBATCH --constraint=80gb', f'#SBATCH --chdir={ROOT}',
               'module load cuda'):
    assert line in out.splitlines(), out
  assert out.count(' main.py ') == 2 and out.count(' --distributed') == 2
  assert not (tmp_path / 'out' / 'slurm').exists()
