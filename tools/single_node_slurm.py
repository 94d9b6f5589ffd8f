r"""A single-node Slurm in a temporary directory, for tests/test_slurm.py and for timing a sweep
through Slurm on one machine: munged (as the munge user, its own key and socket), slurmctld and
slurmd of Debian's packages (setup.sh installs them), run as root without systemd or cgroups. Its
clients find it through SLURM_CONF (`SingleNodeSlurm.env`).

    python tools/single_node_slurm.py --workdir=runs/slurm_timing

runs the same 4 Fashion-MNIST points (MobileNet V1 0.25 at 32 px, seeds 0-3, TIMING_EPOCHS each)
one after another with `sweep.py`, then as a Slurm job array with --max_parallel=2 --wait, and
prints both wall times and whether every point gave the same top-1.
"""

import csv
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

DAEMONS = ('/usr/sbin/munged', '/usr/sbin/slurmctld', '/usr/sbin/slurmd')

SLURM_CONF = """\
ClusterName=tests
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={controller_port}
SlurmdPort={node_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={munge_dir}/munge.sock,cred_expire=10
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/slurmctld.log
SlurmdLogFile={directory}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> str:
  """Why this machine cannot run the cluster ('' where it can)."""
  absent = [d for d in DAEMONS if not os.path.exists(d)]
  absent += [c for c in ('sbatch', 'srun', 'squeue', 'scontrol') if shutil.which(c) is None]
  if absent:
    return f'{", ".join(absent)} not installed (setup.sh installs Slurm as root)'
  if os.geteuid() != 0:
    return 'the single-node Slurm runs as root'
  return ''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class SingleNodeSlurm:
  """Start with `start()`, stop with `stop()`; `env` is the environment its clients need."""

  def __init__(self, directory: str):
    self.directory = str(directory)
    # munged runs as the munge user, who cannot enter pytest's private temporary directories.
    self.munge_dir = tempfile.mkdtemp(prefix='test-slurm-munge-', dir='/tmp')
    self.conf = os.path.join(self.directory, 'slurm.conf')
    self.env = dict(os.environ, SLURM_CONF=self.conf)

  def start(self, timeout: float = 60) -> None:
    for sub in ('state', 'spool'):
      os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
    self._start_munge()
    with open(self.conf, 'w') as f:
      f.write(SLURM_CONF.format(host=socket.gethostname().split('.')[0],
                                directory=self.directory, munge_dir=self.munge_dir,
                                cpus=os.cpu_count(),
                                controller_port=free_port(), node_port=free_port()))
    for daemon in ('/usr/sbin/slurmctld', '/usr/sbin/slurmd'):
      subprocess.run([daemon, '-f', self.conf], check=True, env=self.env, timeout=60)
    deadline = time.time() + timeout
    while self.run('sinfo', '--noheader', '--format=%T').stdout.strip() != 'idle':
      if time.time() > deadline:
        raise RuntimeError('The test Slurm did not come up: ' + self.logs())
      time.sleep(0.5)

  def _start_munge(self) -> None:
    munge_dir = self.munge_dir
    munge = pwd.getpwnam('munge')
    key = os.path.join(munge_dir, 'munge.key')
    with open(key, 'wb') as f:
      f.write(os.urandom(1024))
    for path, mode in ((key, 0o400), (munge_dir, 0o755)):
      os.chown(path, munge.pw_uid, munge.pw_gid)
      os.chmod(path, mode)
    subprocess.run(['runuser', '-u', 'munge', '--', '/usr/sbin/munged',
                    f'--socket={munge_dir}/munge.sock', f'--key-file={key}',
                    f'--pid-file={munge_dir}/munged.pid', f'--log-file={munge_dir}/munged.log',
                    f'--seed-file={munge_dir}/munge.seed'], check=True, timeout=60)

  def run(self, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

  def logs(self) -> str:
    text = []
    for name in ('slurmctld.log', 'slurmd.log'):
      path = os.path.join(self.directory, name)
      if os.path.exists(path):
        text.append(f'{name}:\n' + ''.join(open(path).readlines()[-20:]))
    return '\n'.join(text)

  def stop(self) -> None:
    """Cancels every job, then stops the daemons (slurmd, slurmctld, munged)."""
    self.run('scancel', '--user=root')
    pids = []
    for path in (os.path.join(self.directory, 'slurmd.pid'),
                 os.path.join(self.directory, 'slurmctld.pid'),
                 os.path.join(self.munge_dir, 'munged.pid')):
      try:
        with open(path) as f:
          pids.append(int(f.read()))
        os.kill(pids[-1], signal.SIGTERM)
      except (OSError, ValueError):
        pass
    deadline = time.time() + 10
    for pid in pids:
      try:
        while time.time() < deadline:
          os.kill(pid, 0)
          time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass
    shutil.rmtree(self.munge_dir, ignore_errors=True)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_EPOCHS = 0.25
TIMING_SWEEP = f"""
import ml_collections

def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.groups = [ml_collections.ConfigDict({{
      'base': 'configs/quickstart.py:model=mobilenet_v1,alpha=0.25,res=32', 'mode': 'product',
      'axes': (('seed', (0, 1, 2, 3)),)}})]
  sweep.overrides = (('num_epochs', {TIMING_EPOCHS}),)
  return sweep
"""


def timed_sweep(env: dict, *args: str) -> float:
  """Seconds that `python sweep.py args...` took; raises if it failed."""
  start = time.time()
  subprocess.run([sys.executable, 'sweep.py', *args], cwd=ROOT, env=env, check=True)
  return time.time() - start


def top1(sweep_dir: str) -> dict:
  with open(os.path.join(sweep_dir, 'results.csv')) as f:
    return {r['run']: r['top1'] for r in csv.DictReader(f)}


def main(argv):
  del argv
  why_not = missing()
  if why_not:
    raise SystemExit(f'error: {why_not}.')
  workdir = os.path.abspath(flags.FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  sweep_file = os.path.join(workdir, 'timing_sweep.py')
  with open(sweep_file, 'w') as f:
    f.write(TIMING_SWEEP)
  cluster = SingleNodeSlurm(tempfile.mkdtemp(prefix='single-node-slurm-'))
  cluster.start()
  try:
    one_by_one = timed_sweep(cluster.env, f'--config={sweep_file}',
                             f'--workdir={workdir}/one_after_another')
    throttled = timed_sweep(cluster.env, f'--config={sweep_file}', f'--workdir={workdir}/slurm',
                            '--launch=slurm', '--max_parallel=2', '--wait')
  finally:
    cluster.stop()
  same = top1(f'{workdir}/one_after_another') == top1(f'{workdir}/slurm')
  print(f'4 points one after another: {one_by_one:.0f} s; through Slurm, 2 at a time: '
        f'{throttled:.0f} s ({one_by_one / throttled:.2f}x); the same top-1 for every point: '
        f'{same}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', 'runs/slurm_timing', 'Where the two sweeps go.')
  app.run(main)
