"""Faults: a run never hangs, never reports success it did not earn, survives preemption, full
disks, damaged checkpoints and torn logs, and resumes exactly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import input_pipeline
import sweep
import main
import train
import workdirs
from tests.helpers import (
    ROOT, latest_state, read_jsonl, run_tool, tiny_config, train_args, train_command)


def copy_of(reference_dir, tmp_path, keep_steps=(3, 6, 9, 12)):
  """A copy of a finished workdir without results.json and without the checkpoints after
  `keep_steps`, as a run stopped after its last kept checkpoint would leave it."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference_dir, workdir)
  os.remove(workdir / 'results.json')
  for step in os.listdir(workdir / 'checkpoints'):
    if step.isdigit() and int(step) not in keep_steps:
      shutil.rmtree(workdir / 'checkpoints' / step)
  return workdir


def assert_same_end(workdir, reference_dir):
  step, state = latest_state(workdir)
  reference_step, reference = latest_state(reference_dir)
  assert step == reference_step == 12
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)
  def history(path):
    return [(l['step'], l['split'], l['loss'], l['top1'])
            for l in read_jsonl(os.path.join(path, 'metrics.jsonl'))]
  assert history(workdir) == history(reference_dir)


def run_train(workdir):
  return run_tool(*train_args(workdir), timeout=600)


def test_too_few_examples_for_a_process_is_an_error(monkeypatch):
  config = tiny_config(synthetic_train_examples=12)  # 6 per process, batch 8 per process
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  data = input_pipeline.load(config)
  with pytest.raises(ValueError, match=r'12 training examples \(6 for this process\), fewer '
                                       r'than one batch of batch_size=16 \(8 per process\)'):
    input_pipeline.check_train_size(data, config)


def test_a_workdir_that_cannot_be_written_is_an_error_before_loading_data(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match=r'Cannot write to --workdir=.*file/run \(Not a directory\)'):
    train.train_and_evaluate(tiny_config(dataset='no_such_dataset'), str(tmp_path / 'file' / 'run'))


def test_a_run_without_a_final_evaluation_is_not_done(tmp_path):
  (tmp_path / 'results.json').write_text(json.dumps({'steps': 0, 'final_top1': None}))
  assert sweep.status(str(tmp_path)) == 'failed'
  (tmp_path / 'results.json').write_text(json.dumps({'steps': 12, 'final_top1': 0.5}))
  assert sweep.status(str(tmp_path)) == 'done'


def test_rerunning_a_finished_run_leaves_its_results(uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted[0], workdir)
  before = (workdir / 'results.json').read_text()
  assert train.train_and_evaluate(tiny_config(), str(workdir)) == json.loads(before)
  assert (workdir / 'results.json').read_text() == before
  # Its results lost (a crash after the last checkpoint): evaluated again, not left empty.
  os.remove(workdir / 'results.json')
  results = train.train_and_evaluate(tiny_config(), str(workdir))
  assert results['final_top1'] == uninterrupted[1]['final_top1'] and results['eval_count'] == 20


def test_resume_may_change_the_length_but_not_the_trajectory(uninterrupted, tmp_path):
  workdir = copy_of(uninterrupted[0], tmp_path)
  for field, value in (('batch_size', 32), ('learning_rate', 0.2), ('seed', 1)):
    with pytest.raises(ValueError, match=f'holds a run with {field}=.*a resumed run may change '
                                         'only num_epochs, num_train_steps'):
      train.train_and_evaluate(tiny_config(**{field: value}), str(workdir))
  assert not os.path.exists(workdir / 'config_changes.jsonl')
  results = train.train_and_evaluate(tiny_config(num_train_steps=14), str(workdir))
  assert results['steps'] == 14
  assert read_jsonl(workdir / 'config_changes.jsonl') == [
      {'step': 12, 'changes': {'num_train_steps': [12, 14]}}]
  assert workdirs.read_config(str(workdir))['num_train_steps'] == 14


@pytest.mark.slow
def test_a_torn_metrics_line_is_dropped_and_the_run_resumes(uninterrupted, tmp_path):
  workdir = copy_of(uninterrupted[0], tmp_path, keep_steps=(3, 6, 9))
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 10, "split": "tr')  # a crash in the middle of a line
  run = run_train(workdir)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'Dropping 1 unreadable line(s)' in run.stderr
  assert_same_end(workdir, uninterrupted[0])


@pytest.mark.slow
def test_a_damaged_checkpoint_is_moved_aside_and_the_run_resumes(uninterrupted, tmp_path):
  workdir = copy_of(uninterrupted[0], tmp_path)
  files = [os.path.join(d, f) for d, _, names in os.walk(workdir / 'checkpoints' / '12')
           for f in names]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)
  run = run_train(workdir)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'The checkpoint at step 12 does not restore' in run.stderr
  damaged = os.listdir(workdir / 'damaged_checkpoints')
  assert len(damaged) == 1 and damaged[0].startswith('12.')  # kept, not deleted
  assert_same_end(workdir, uninterrupted[0])


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_the_failed_checkpoint(uninterrupted, tmp_path):
  workdir = copy_of(uninterrupted[0], tmp_path, keep_steps=(3, 6))
  # Files of at most 300 kB (ulimit -f counts KiB): a checkpoint of this network is 2.7 MB in
  # files of up to 1.1 MB, its metrics and event files stay far smaller.
  run = subprocess.run(['bash', '-c', 'ulimit -f 293 && exec "$@"', 'bash',
                        *train_command(workdir)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 1
  assert 'Traceback' not in run.stderr and 'Event loop is closed' not in run.stderr
  assert run.stderr.strip().splitlines()[-1].startswith(
      'error: Writing the checkpoint of step 9 in ')
  assert [l['step'] for l in read_jsonl(workdir / 'metrics.jsonl')][-1] == 8  # stopped at once
  assert not os.path.exists(workdir / 'results.json')
  assert workdirs.restore_variables(str(workdir))[1] == 6  # the last complete one restores
  # With space again, the same command resumes from it and ends where the reference ends.
  assert run_train(workdir).returncode == 0
  assert_same_end(workdir, uninterrupted[0])


def _start_and_wait_for_checkpoint_3(workdir):
  process = subprocess.Popen(train_command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  checkpoints = workdir / 'checkpoints'
  deadline = time.time() + 300  # a hang guard, far above the ~20 s this takes
  while not (checkpoints.is_dir() and '3' in os.listdir(checkpoints)):
    assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
    time.sleep(0.02)
  return process


@pytest.mark.slow
def test_kill_9_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  process = _start_and_wait_for_checkpoint_3(workdir)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert not os.path.exists(workdir / 'results.json'), 'killed too late'
  assert workdirs.restore_variables(str(workdir))[1] < 12
  train.train_and_evaluate(tiny_config(), str(workdir))
  assert_same_end(workdir, uninterrupted[0])


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_the_rerun_ends_as_uninterrupted(uninterrupted,
                                                                         tmp_path):
  workdir = tmp_path / 'run'
  process = _start_and_wait_for_checkpoint_3(workdir)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == main.PREEMPTED_EXIT_STATUS, stderr[-3000:]
  step = workdirs.restore_variables(str(workdir))[1]
  assert 3 <= step < 12 and f'after step {step}, which is checkpointed' in stderr
  assert not os.path.exists(workdir / 'results.json')
  assert run_train(workdir).returncode == 0
  assert_same_end(workdir, uninterrupted[0])


@pytest.mark.slow
def test_a_second_signal_stops_at_once():
  """In a process of its own: the first SIGTERM only asks to stop, the second stops at once."""
  program = """
import os, signal, sys, time
import main
import main
with main.PreemptionSignals() as preemption:
  os.kill(os.getpid(), signal.SIGTERM)
  while not preemption.reached(1):
    time.sleep(0.01)
  print('asked to stop', flush=True)
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(60)
sys.exit(0)
"""
  run = subprocess.run([sys.executable, '-c', program], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.stdout == 'asked to stop\n' and run.returncode == -signal.SIGTERM, run.stderr[-2000:]
