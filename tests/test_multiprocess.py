"""Several JAX processes on this machine (CPU collectives between processes), started as README's
"Several hosts" says: 2 processes x 2 devices train, evaluate and checkpoint as 1 process x 4
devices does, their checkpoints resume on the other number of processes, only process 0 writes
the run's files, and a killed process stops the others within the heartbeat timeout.

float32 trajectories of the tiny network diverge chaotically after two or three steps whatever
changes (a 1e-7 change of the initial weights gives 1e-3 in the loss by step 4, in one process),
so the equivalence runs take two steps, at a learning rate at which a gradient that is not
averaged over both processes, or a process that reads the wrong examples, moves the losses and
the parameters far past the 1e-5 the tests allow."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import flax
import numpy as np
import pytest

from tests.helpers import (
    ROOT, latest_state, read_jsonl, run_tool, tiny_config, train_args, train_command)
import workdirs

pytestmark = pytest.mark.slow

DEVICES = 4
# Two steps, each logged and checkpointed, then an evaluation of the 20 examples (4 batches of 16
# over 2 processes of 8: the last padded).
EQUIVALENCE = {'num_train_steps': 2, 'learning_rate': 0.01, 'log_every_steps': 1,
               'checkpoint_every_steps': 1, 'eval_every_steps': 2}
HEARTBEAT_TIMEOUT = 5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir, num_processes: int, extra_flags=(), **overrides) -> list[subprocess.Popen]:
  """The tiny config's run on `num_processes` processes of DEVICES / num_processes CPU devices
  each, started as README says; stdout and stderr of process i go to `workdir`.i.log."""
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES // num_processes}')
  command = train_command(workdir, **overrides) + list(extra_flags)
  if num_processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f'localhost:{free_port()}',
               JAX_NUM_PROCESSES=str(num_processes))
    command += ['--distributed', f'--heartbeat_timeout={HEARTBEAT_TIMEOUT}']
  return [subprocess.Popen(command, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)),
                           stdout=open(f'{workdir}.{i}.log', 'w'), stderr=subprocess.STDOUT)
          for i in range(num_processes)]


def wait_ok(processes, workdir, timeout=300):
  for i, p in enumerate(processes):
    assert p.wait(timeout=timeout) == 0, open(f'{workdir}.{i}.log').read()[-3000:]


def train_losses(workdir) -> dict:
  return {r['step']: r['loss'] for r in read_jsonl(f'{workdir}/metrics.jsonl')
          if r['split'] == 'train'}


def final_eval(workdir) -> dict:
  return [r for r in read_jsonl(f'{workdir}/metrics.jsonl') if r['split'] == 'eval'][-1]


def initial_params() -> dict:
  """The equivalence runs' parameters before the first step (initialisation does not depend on
  the devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(**EQUIVALENCE)
  state = train.create_train_state(config, models.get_model(config), optax.identity())
  return flax.traverse_util.flatten_dict(jax.device_get(state.params), sep='/')


def assert_same_run(workdir, reference):
  """Per-step losses and the final evaluation within 1e-5, every eval example counted once, and
  the parameters after the first step (from the same weights: the gradient's rounding only) within
  1e-4 of how far that step moved them."""
  losses, expected = train_losses(workdir), train_losses(reference)
  assert sorted(losses) == sorted(expected) == list(range(1, EQUIVALENCE['num_train_steps'] + 1))
  for step, loss in expected.items():
    assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (step, losses[step], loss)
  ours, theirs = final_eval(workdir), final_eval(reference)
  assert ours['count'] == theirs['count'] == 20
  assert ours['top1'] == theirs['top1'] and ours['ema_top1'] == theirs['ema_top1']
  assert abs(ours['loss'] - theirs['loss']) <= 1e-5 * theirs['loss']
  assert latest_state(workdir)[0] == latest_state(reference)[0] == len(expected)
  params, ref_params = (flax.traverse_util.flatten_dict(
      workdirs.restore_on_host(w, step=1)[0]['params'], sep='/') for w in (workdir, reference))
  initial = initial_params()
  moved = max(np.abs(ref_params[k] - initial[k]).max() for k in ref_params)
  differ = max(np.abs(params[k] - ref_params[k]).max() for k in ref_params)
  assert moved > 1e-2 and differ <= 1e-4 * moved, (differ, moved)


@pytest.fixture(scope='module')
def one_and_two_processes(tmp_path_factory):
  """(workdir of 1 process x 4 devices, workdir of 2 processes x 2 devices), the equivalence
  config run in both at once."""
  one, two = (str(tmp_path_factory.mktemp(name)) for name in ('one_process', 'two_processes'))
  runs = [(one, launch(one, 1, **EQUIVALENCE)), (two, launch(two, 2, **EQUIVALENCE))]
  for workdir, processes in runs:
    wait_ok(processes, workdir)
  return one, two


def test_two_processes_train_evaluate_and_checkpoint_as_one(one_and_two_processes):
  one, two = one_and_two_processes
  assert_same_run(two, one)
  results = [json.load(open(f'{w}/results.json')) for w in (one, two)]
  assert results[0]['eval_count'] == results[1]['eval_count'] == 20
  assert results[0]['final_top1'] == results[1]['final_top1']


def test_only_process_0_writes_the_run_files(one_and_two_processes):
  _, two = one_and_two_processes
  files = sorted(f for f in os.listdir(two) if f != 'checkpoints')
  assert [f for f in files if not f.startswith('events.out.tfevents')] == [
      'config.json', 'metrics.jsonl', 'results.json']
  assert len([f for f in files if f.startswith('events.out.tfevents')]) == 1
  records = [(r['step'], r['split']) for r in read_jsonl(f'{two}/metrics.jsonl')]
  assert len(records) == len(set(records)) == 3  # steps 1 and 2 and the eval at 2, once each
  assert sorted(os.listdir(f'{two}/checkpoints')) == ['1', '2']


def resume_from_step_1(workdir, copy):
  """A copy of `workdir` without its last checkpoint, as a run stopped after step 1 leaves it."""
  shutil.copytree(workdir, copy)
  shutil.rmtree(f'{copy}/checkpoints/2')
  os.remove(f'{copy}/results.json')
  return copy


def test_checkpoints_resume_on_another_number_of_processes(one_and_two_processes, tmp_path):
  one, two = one_and_two_processes
  on_two = resume_from_step_1(one, str(tmp_path / 'one_then_two'))
  on_one = resume_from_step_1(two, str(tmp_path / 'two_then_one'))
  runs = [(on_two, launch(on_two, 2, **EQUIVALENCE)), (on_one, launch(on_one, 1, **EQUIVALENCE))]
  for workdir, processes in runs:
    wait_ok(processes, workdir)
  for workdir in (on_two, on_one):
    assert 'Resumed from the checkpoint at step 1' in open(f'{workdir}.0.log').read()
    assert_same_run(workdir, one)


def test_a_killed_process_stops_the_others_and_the_rerun_resumes(tmp_path):
  """kill -9 of process 1 once step 5 is logged (the checkpoint of step 4 written): process 0
  stops within the heartbeat timeout, and the rerun resumes from step 4 and repeats the losses
  the first run logged after it bit for bit (the same processes and devices)."""
  workdir = str(tmp_path / 'run')
  settings = {'log_every_steps': 1, 'checkpoint_every_steps': 4}
  processes = launch(workdir, 2, **settings)
  deadline = time.time() + 240
  while not (os.path.exists(f'{workdir}/metrics.jsonl') and 5 in train_losses(workdir)):
    assert time.time() < deadline and processes[0].poll() is None, open(f'{workdir}.0.log').read()
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGKILL)
  killed = time.time()
  status = processes[0].wait(timeout=HEARTBEAT_TIMEOUT + 60)
  log = open(f'{workdir}.0.log').read()
  assert status != 0 and time.time() - killed < HEARTBEAT_TIMEOUT + 30, log[-2000:]
  assert 'another task died' in log, log[-2000:]
  first = train_losses(workdir)
  assert latest_state(workdir)[0] == 4 and max(first) > 4, sorted(first)

  wait_ok(launch(workdir, 2, **settings), workdir)
  assert 'Resumed from the checkpoint at step 4' in open(f'{workdir}.0.log').read()
  again = train_losses(workdir)
  assert sorted(again) == list(range(1, 13))
  assert {step: again[step] for step in first} == first
  assert json.load(open(f'{workdir}/results.json'))['eval_count'] == 20


def test_processes_started_with_different_workdirs_stop_with_one_error(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COORDINATOR_ADDRESS=f'localhost:{free_port()}', JAX_NUM_PROCESSES='2')
  processes = [subprocess.Popen(train_command(tmp_path / f'run{i}') + ['--distributed'], cwd=ROOT,
                                env=dict(env, JAX_PROCESS_ID=str(i)), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for i in range(2)]
  for p in processes:
    output = p.communicate(timeout=120)[0]
    assert p.returncode == 1, output[-2000:]
    assert ('error: Process(es) [1] were started with another config or --workdir than process '
            '0') in output
  assert not any((tmp_path / f'run{i}').exists() for i in range(2))


def test_a_coordinator_that_does_not_answer_is_one_error_after_the_timeout(tmp_path):
  address = f'localhost:{free_port()}'  # nothing listens there
  start = time.time()
  result = run_tool(*train_args(tmp_path / 'run'), '--distributed',
                    f'--coordinator_address={address}', '--num_processes=2', '--process_id=1',
                    '--initialization_timeout=3', timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  assert f'error: This process could not join the run coordinated at {address} within 3 s' in result.stderr
  assert time.time() - start < 60
  assert not (tmp_path / 'run').exists()


def test_a_coordinator_whose_peers_do_not_arrive_names_them_after_the_timeout(tmp_path):
  """Process 0 of 3 with only process 1 started: one line naming process 2, not JAX's abort;
  process 1 is told that process 0 gave up."""
  address = f'localhost:{free_port()}'
  def start(process_id):
    return subprocess.Popen(
        train_command(tmp_path / 'run') + [
            '--distributed', f'--coordinator_address={address}', '--num_processes=3',
            f'--process_id={process_id}', '--initialization_timeout=8'],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  start_time = time.time()
  coordinator, peer = start(0), start(1)
  (_, coordinator_err), (_, peer_err) = coordinator.communicate(120), peer.communicate(120)
  assert coordinator.returncode == 1, coordinator_err[-3000:]
  assert coordinator_err.strip().splitlines()[-1] == (
      f'error: Process(es) 2 of 3 did not join the run coordinated here at {address} within 8 s: '
      'start them with the same --coordinator_address and --num_processes and their own '
      f'--process_id, and check that port {address.rpartition(":")[2]} of this host is reachable '
      'from theirs (--initialization_timeout).')
  assert peer.returncode == 1, peer_err[-3000:]
  assert peer_err.strip().splitlines()[-1] == (
      f'error: Process 0 at {address} stopped before every process had joined (see its error): '
      'start all processes again.')
  assert 'Traceback' not in coordinator_err + peer_err and 'Abort' not in coordinator_err
  assert time.time() - start_time < 60
  assert not (tmp_path / 'run').exists()
