r"""Sweeps on a Slurm cluster (`sweep.py --launch=slurm`): the pending points of a sweep go to
Slurm as one job array, submitted with submitit, at most `max_parallel` running at once. Each
point is one `main.py` run in its own directory, started once per task by srun; a point of
several tasks is one multi-process JAX run that takes its settings from Slurm's environment
(main.py --distributed).

Preemption, the time limit and `scancel --signal=TERM` all reach main.py as SIGTERM (the array is
submitted with `--signal=TERM@<signal_delay_s>` and `--requeue`): main.py checkpoints the step
it is at and exits with status 75, and task 0 requeues its array task, which resumes from that
step when Slurm starts it again.

DIR/slurm/jobs.json records the array task of every point submitted ('1234_5'), so that
rerunning the sweep while the array is queued or running submits nothing twice, and `--collect`
shows queued and running points (from squeue: there may be no accounting database for sacct).
submitit's files (each job's pickled task, its stdout and stderr) are in DIR/slurm/<job id>/.
"""

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

import submitit
from submitit.core import utils as submitit_utils
from submitit.slurm import slurm as submitit_slurm

import workdirs

ROOT = os.path.dirname(os.path.abspath(__file__))
SLURM_DIR = 'slurm'  # DIR/slurm/: jobs.json and submitit's folders
# squeue's states of a job that is still there, as --collect shows them.
RUNNING_STATES = ('RUNNING', 'COMPLETING', 'CONFIGURING', 'SIGNALING')
# File systems that live in one machine's memory: the compute nodes cannot see them.
NODE_LOCAL_FILE_SYSTEMS = ('tmpfs', 'ramfs', 'devtmpfs')


@dataclasses.dataclass(frozen=True)
class Resources:
  """What every point asks of Slurm (sbatch's options of the same names)."""
  partition: Optional[str] = None
  account: Optional[str] = None
  qos: Optional[str] = None
  time_minutes: int = 24 * 60
  nodes: int = 1
  tasks_per_node: int = 1
  gpus_per_node: int = 0
  cpus_per_task: Optional[int] = None
  mem: Optional[str] = None
  signal_delay_s: int = 120  # SIGTERM this long before the time limit
  sbatch_options: tuple[str, ...] = ()  # 'name=value' or 'name', passed on as --name=value
  setup: tuple[str, ...] = ()  # shell lines run before srun (module load ..., source ...)

  @property
  def tasks(self) -> int:
    return self.nodes * self.tasks_per_node

  def submitit_parameters(self, max_parallel: int, job_name: str) -> dict:
    """The parameters of submitit's SlurmExecutor (its sbatch file) for these resources."""
    extra = {'signal': f'TERM@{self.signal_delay_s}', 'requeue': True, 'chdir': ROOT}
    for option in self.sbatch_options:
      name, has_value, value = option.lstrip('-').partition('=')
      extra[name.replace('-', '_')] = value if has_value else True
    parameters = dict(job_name=job_name, partition=self.partition, account=self.account,
                      qos=self.qos, time=self.time_minutes, nodes=self.nodes,
                      ntasks_per_node=self.tasks_per_node, cpus_per_task=self.cpus_per_task,
                      gpus_per_node=self.gpus_per_node or None, mem=self.mem,
                      signal_delay_s=self.signal_delay_s, array_parallelism=max_parallel,
                      setup=list(self.setup) or None, additional_parameters=extra)
    return {k: v for k, v in parameters.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class PointTask:
  """What one Slurm task of a point runs: the point's main.py command, its output in the run's
  train.log (task 0) or train.task<k>.log. A run stopped by a signal (exit status 75 after its
  checkpoint, or killed by a second SIGTERM before it) makes task 0 requeue the job, which then
  resumes from the last checkpoint; any other failure marks the point FAILED."""
  run_dir: str
  command: tuple[str, ...]

  def __call__(self) -> str:
    import main  # pylint: disable=g-import-not-at-top  (here: on the compute node, not at submit)
    import sweep  # pylint: disable=g-import-not-at-top  (sweep.py imports this module)
    rank = submitit.JobEnvironment().global_rank
    log_name = 'train.log' if rank == 0 else f'train.task{rank}.log'
    returncode = sweep.run_command(list(self.command), self.run_dir, log_name)
    if returncode in (main.PREEMPTED_EXIT_STATUS, -signal.SIGTERM):
      if rank == 0:
        requeue(os.environ['SLURM_JOB_ID'])
      sys.exit(main.PREEMPTED_EXIT_STATUS)
    if rank != 0:
      if returncode:
        raise RuntimeError(f'task {rank} failed with exit status {returncode}; '
                           f'see {self.run_dir}/{log_name}')
      return 'done'
    result = sweep.outcome(self.run_dir, returncode)
    if result != 'done':
      raise RuntimeError(result)
    return result


def requeue(job_id: str) -> None:
  """Puts the running job `job_id` (SLURM_JOB_ID, also for an array task) back in the queue
  (`scontrol requeue`); a job that Slurm requeues itself (preemption with PreemptMode=REQUEUE)
  may refuse it, which is fine."""
  result = subprocess.run(['scontrol', 'requeue', job_id], capture_output=True, text=True,
                          timeout=60, check=False)
  print(f'requeue {job_id}: {result.stderr.strip() or "requeued"}', flush=True)


def check_cluster(resources: Resources, workdir: str) -> None:
  """ValueError, before anything is submitted, where sbatch is missing, Slurm does not answer,
  the partition does not exist, or the sweep directory is one the compute nodes cannot reach."""
  if not workdirs.is_local(workdir):
    raise ValueError(f'--launch=slurm keeps its job files in the sweep directory: --workdir='
                     f'{workdir} must be a directory on a file system the compute nodes share '
                     '(not object storage).')
  file_system = file_system_type(workdir)
  if file_system in NODE_LOCAL_FILE_SYSTEMS:
    raise ValueError(f'--workdir={workdir} is on a {file_system}, in this machine\'s memory: the '
                     'compute nodes cannot reach it. Use a directory on a shared file system.')
  missing = [p for p in ('sbatch', 'squeue', 'sinfo', 'scontrol') if shutil.which(p) is None]
  if missing:
    raise ValueError(f'{", ".join(missing)} not found: --launch=slurm runs where Slurm\'s '
                     'commands work (a login node of the cluster); on this machine use '
                     '--launch=local.')
  listed = subprocess.run(['sinfo', '--noheader', '--format=%R'], capture_output=True, text=True,
                          timeout=60, check=False)
  if listed.returncode != 0:
    raise ValueError(f'Slurm does not answer (sinfo: {last_line(listed.stderr)}): check that '
                     'its controller runs and SLURM_CONF names its configuration.')
  partitions = sorted(set(listed.stdout.split()))
  if resources.partition is not None and resources.partition not in partitions:
    raise ValueError(f'Slurm has no partition {resources.partition!r} (it has '
                     f'{", ".join(partitions) or "none"}): check --slurm_partition.')


def file_system_type(path: str) -> str:
  """The type of the file system that holds `path` (or its nearest existing parent), from
  /proc/mounts; '' where that cannot be read."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  path = os.path.realpath(path)
  best, kind = '', ''
  try:
    with open('/proc/mounts') as mounts:
      for line in mounts:
        _, mount_point, fs_type = line.split()[:3]
        inside = path == mount_point or path.startswith(mount_point.rstrip('/') + '/')
        if inside and len(mount_point) >= len(best):
          best, kind = mount_point, fs_type
  except OSError:
    return ''
  return kind


def last_line(text: str) -> str:
  lines = text.strip().splitlines()
  return lines[-1] if lines else 'no output'


def records_path(workdir: str) -> str:
  return os.path.join(workdir, SLURM_DIR, 'jobs.json')


def read_records(workdir: str) -> dict[str, str]:
  """{point name: array task id} of every point submitted from this sweep directory."""
  path = records_path(workdir)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def queue_states() -> dict[str, str]:
  """{job id ('1234_5' for an array task): 'queued' or 'running'} of this user's jobs that
  Slurm still holds (squeue, one line per array task)."""
  listed = subprocess.run(['squeue', '--noheader', '--array', '--me', '--format=%i %T'],
                          capture_output=True, text=True, timeout=60, check=False)
  if listed.returncode != 0:
    raise ValueError(f'squeue failed ({last_line(listed.stderr)}): check that Slurm answers.')
  states = {}
  for line in listed.stdout.splitlines():
    job_id, state = line.split()
    states[job_id] = 'running' if state in RUNNING_STATES else 'queued'
  return states


def point_queue_states(workdir: str) -> dict[str, str]:
  """{point name: 'queued' or 'running'} of the points whose array task Slurm still holds; {}
  for a sweep directory with no Slurm jobs, or where there is no squeue (a copy collected
  elsewhere)."""
  records = read_records(workdir)
  if not records or shutil.which('squeue') is None:
    return {}
  states = queue_states()
  return {name: states[job] for name, job in records.items() if job in states}


def sbatch_script(resources: Resources, max_parallel: int, job_name: str, workdir: str,
                  count: int) -> str:
  """The sbatch file submitit writes for an array of `count` points (for --dry_run)."""
  command = ' '.join(shlex.quote(a) for a in
                     (sys.executable, '-u', '-m', 'submitit.core._submit',
                      os.path.join(workdir, SLURM_DIR, '%j')))
  return submitit_slurm._make_sbatch_string(  # pylint: disable=protected-access
      command=command, folder=os.path.join(workdir, SLURM_DIR, '%j'), map_count=count,
      **resources.submitit_parameters(max_parallel, job_name))


def submit(tasks: dict[str, PointTask], workdir: str, resources: Resources,
           max_parallel: int, job_name: str) -> dict[str, str]:
  """Submits `tasks` ({point name: its task}) as one job array; records and returns
  {point name: array task id}. ValueError, with nothing submitted or recorded, if sbatch refuses
  it (an unknown account or QOS, a time above the partition's limit)."""
  executor = submitit.SlurmExecutor(folder=os.path.join(workdir, SLURM_DIR, '%j'))
  executor.update_parameters(**resources.submitit_parameters(max_parallel, job_name))
  try:
    with executor.batch():
      jobs = {name: executor.submit(task) for name, task in tasks.items()}
  except submitit_utils.FailedJobError as e:  # sbatch refused the array: nothing was submitted
    sbatch_said = (str(e).strip().splitlines() or ['no output'])[0]
    raise ValueError(f'sbatch refused the job array ({sbatch_said}): check the --slurm_* '
                     'settings.') from None
  submitted = {name: job.job_id for name, job in jobs.items()}
  workdirs.write_json_atomic(records_path(workdir), {**read_records(workdir), **submitted})
  return submitted


def wait(workdir: str, names: list[str], report: Callable[[str], None],
         poll_seconds: float = 2.0) -> None:
  """Returns when Slurm holds none of the points `names` any more; reports every change of a
  point's state ('queued', 'running', or gone from the queue)."""
  seen = {}
  while True:
    states = point_queue_states(workdir)
    for name in names:
      state = states.get(name, 'left the queue')
      if seen.get(name) != state:
        report(f'{name}: {state}')
        seen[name] = state
    if not any(name in states for name in names):
      return
    time.sleep(poll_seconds)
