r"""Trains and evaluates a network: the command line around train.py.

    python main.py --config=configs/mobilenet_v2.py:alpha=0.5 --workdir=runs/v2_0.5

The same command runs on one CPU, one GPU, every GPU of a machine and every host of a TPU slice
(add --distributed on multi-process launches). This module is the launch: flags, the start-up
restart with glibc's malloc tunables, multi-process start-up, preemption signals and the console;
train.py is the loop.
"""

import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

import malloc_tunables
import quiet_tensorflow

PROCESS_START = time.time()
if __name__ == '__main__':
  # Before TensorFlow and JAX are imported (the imports below come after this on purpose): the
  # restart runs this file again from the start, and they load and greet once.
  malloc_tunables.restart_with_tunables()
  quiet_tensorflow.import_tensorflow()  # without its doubled oneDNN banner on stderr

from absl import app
from absl import flags
from absl import logging
import jax
from jax._src import clusters as jax_clusters
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np

import cli
import train
import workdirs

# The exit status of a run stopped by SIGTERM or SIGINT after checkpointing (sysexits' EX_TEMPFAIL:
# "try again"): rerunning the same command resumes it.
PREEMPTED_EXIT_STATUS = 75


class PreemptionSignals:
  """Within `with`, SIGTERM (what Cloud TPU and SLURM send before they stop a job) and SIGINT ask
  the training loop to checkpoint the step it is at and stop; a second signal stops at once.

  In a multi-process run JAX's preemption service catches SIGTERM and every process stops at
  the same step (`reached_preemption_sync_point`)."""

  def __init__(self):
    self.requested = False
    self.multi_process = jax.process_count() > 1
    self.signals = [signal.SIGINT] if self.multi_process else [signal.SIGTERM, signal.SIGINT]

  def __enter__(self):
    # Python takes signals in the main thread only; elsewhere (a caller's worker thread) the
    # process keeps its own handling.
    in_main_thread = threading.current_thread() is threading.main_thread()
    self.previous = {s: signal.signal(s, self._handle) for s in self.signals if in_main_thread}
    return self

  def __exit__(self, *exc_info):
    for s, handler in self.previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # the second signal: stop now, as without this handler
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.requested = True
    logging.warning('%s: checkpointing this step, then stopping (send it again to stop now).',
                    signal.Signals(signum).name)

  def reached(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop; call once per step."""
    if self.multi_process and multihost_utils.reached_preemption_sync_point(step):
      return True
    return self.requested


def initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                           process_id: Optional[int], initialization_timeout: int,
                           heartbeat_timeout: int) -> None:
  """Joins this process to a multi-process run (`jax.distributed.initialize`): with the three
  launch settings given, or with none (Cloud TPU, Slurm and Open MPI provide them). ValueError
  for a partial or inconsistent launch, or, with the coordinator's address given or taken from
  Slurm, for a coordinator not reached (on process 0: processes that did not arrive) within
  `initialization_timeout` seconds (`slurm_process_settings` says which devices a Slurm task
  uses). Once running, every process stops (exit status 134, "the JAX distributed service
  detected fatal errors") within `heartbeat_timeout` seconds of the death of another."""
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if any(v is None for v in given.values()) and any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    raise ValueError(f'--distributed needs all of --coordinator_address, --num_processes and '
                     f'--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                     f'JAX_PROCESS_ID), or none of them on Cloud TPU and SLURM; '
                     f'{", ".join(missing)} missing.')
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'process_id={process_id} must be in [0, num_processes={num_processes}).')
  from_slurm = coordinator_address is None and jax_clusters.SlurmCluster.is_env_present()
  local_device_ids = None
  if from_slurm:
    coordinator_address, num_processes, process_id, local_device_ids = slurm_process_settings()
  if coordinator_address is not None:
    # JAX aborts the process (no exception, no names) when a process is missing at its start-up.
    if process_id == 0:
      wait_for_processes(coordinator_address, num_processes, initialization_timeout,
                         SLURM_ADVICE if from_slurm else FLAGS_ADVICE)
    else:
      wait_for_coordinator(coordinator_address, process_id, initialization_timeout)
  jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                             cluster_detection_method='deactivate' if from_slurm else None,
                             initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout)


def slurm_process_settings() -> tuple[str, int, int, Optional[list[int]]]:
  """(coordinator address, number of processes, this process's id, its local GPUs) of a task
  started by srun, as JAX's Slurm detection gives them: the step's first node at a port that
  follows from the job id (or $JAX_COORDINATOR_PORT), SLURM_NTASKS, SLURM_PROCID; and with
  several tasks on a node, GPU SLURM_LOCALID for each, but with one task per node all of the
  node's devices (None), where JAX would keep GPU 0 only."""
  slurm = jax_clusters.SlurmCluster
  address = slurm.get_coordinator_address(timeout_secs=None, override_coordinator_port=
                                          os.environ.get('JAX_COORDINATOR_PORT'))
  num_processes = slurm.get_process_count()
  one_per_node = num_processes == int(os.environ.get('SLURM_STEP_NUM_NODES', num_processes))
  local_device_ids = None if one_per_node else [slurm.get_local_process_id()]
  return address, num_processes, slurm.get_process_id(), local_device_ids


FLAGS_ADVICE = ('start them with the same --coordinator_address and --num_processes and their '
                'own --process_id')
SLURM_ADVICE = ('check that Slurm started every task of the step (srun, --ntasks; the tasks\' '
                'logs) and that no other job uses the port')


def host_and_port(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'coordinator_address={address!r} must be host:port.')
  return host.strip('[]'), int(port)


def wait_for_processes(address: str, num_processes: int, timeout: float,
                       advice: str = FLAGS_ADVICE) -> None:
  """On process 0, before JAX's own start-up: listens on `address`'s port until processes 1 to
  `num_processes` - 1 have announced themselves (`wait_for_coordinator`), then lets them go on.
  ValueError naming the processes that did not arrive within `timeout` seconds, with `advice`
  on how they are started."""
  _, port = host_and_port(address)
  if socket.has_dualstack_ipv6():  # JAX's service listens on [::]:port, IPv4 included
    server = socket.create_server(('::', port), family=socket.AF_INET6, dualstack_ipv6=True)
  else:
    server = socket.create_server(('', port))
  arrived = {}  # process id: its connection
  deadline = time.time() + timeout
  try:
    while len(arrived) < num_processes - 1 and time.time() < deadline:
      server.settimeout(max(deadline - time.time(), 0.01))
      try:
        connection, _ = server.accept()
        connection.settimeout(5)
        announced = connection.makefile().readline().strip()
      except OSError:  # the deadline, or a peer that left before it announced itself
        continue
      if announced.isdigit() and 0 < int(announced) < num_processes:
        if int(announced) in arrived:  # restarted: the newest one is the one waiting
          arrived[int(announced)].close()
        arrived[int(announced)] = connection
      else:
        connection.close()
    missing = sorted(set(range(1, num_processes)) - set(arrived))
    if missing:
      raise ValueError(
          f'Process(es) {", ".join(map(str, missing))} of {num_processes} did not join the run '
          f'coordinated here at {address} within {timeout:g} s: {advice}, and check that '
          f'port {port} of this host is reachable from theirs (--initialization_timeout).')
    for connection in arrived.values():
      try:
        connection.sendall(b'go\n')
      except OSError:  # it left again: JAX's start-up stops the run
        pass
  finally:
    for connection in arrived.values():
      connection.close()
    server.close()


def wait_for_coordinator(address: str, process_id: int, timeout: float) -> None:
  """On the other processes: announces `process_id` to process 0 at `address` and returns when
  process 0 has heard from every process (`wait_for_processes`). ValueError naming the address
  after `timeout` seconds, or when process 0 gives up first."""
  host, port = host_and_port(address)
  deadline = time.time() + timeout
  while True:
    try:
      with socket.create_connection((host, port), timeout=1) as connection:
        connection.sendall(f'{process_id}\n'.encode())
        connection.settimeout(max(deadline - time.time(), 0.01) + 5)
        if connection.makefile().readline().strip() == 'go':
          return
        raise ValueError(f'Process 0 at {address} stopped before every process had joined (see '
                         'its error): start all processes again.')
    except OSError as e:
      if time.time() > deadline:
        raise ValueError(
            f'This process could not join the run coordinated at {address} within {timeout} s '
            f'({getattr(e, "strerror", None) or e}): start process 0 there first, or check the '
            'address, port and firewall (--coordinator_address, --initialization_timeout).'
        ) from None
      time.sleep(0.5)


def check_same_launch(config: ml_collections.ConfigDict, workdir: str) -> None:
  """ValueError on every process unless all processes of a multi-process run were given the
  same config and workdir (otherwise they would wait for each other's checkpoints for ever)."""
  launch = json.dumps([workdirs.config_as_dict(config), workdir], sort_keys=True)
  digest = np.frombuffer(hashlib.sha256(launch.encode()).digest(), np.uint8)
  digests = multihost_utils.process_allgather(digest)
  differing = [i for i, d in enumerate(digests) if not np.array_equal(d, digests[0])]
  if differing:
    raise ValueError(f'Process(es) {differing} were started with another config or --workdir '
                     'than process 0: start every process with the same command.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.quiet_console()
  f = flags.FLAGS
  try:
    if f.distributed:
      initialize_distributed(f.coordinator_address, f.num_processes, f.process_id,
                             f.initialization_timeout, f.heartbeat_timeout)
    if jax.process_count() > 1:
      check_same_launch(f.config, f.workdir)
    logging.info('JAX process %d of %d, %d local devices of %d: %s', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].device_kind)
    with PreemptionSignals() as preemption:
      train.train_and_evaluate(f.config, f.workdir, start_time=PROCESS_START,
                               stop_requested=preemption.reached)
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(PREEMPTED_EXIT_STATUS)
  except (ValueError, FloatingPointError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
  flags.DEFINE_bool('distributed', False,
                    'Join a multi-process run (jax.distributed.initialize) before anything else.')
  flags.DEFINE_string('coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
                      'With --distributed: host:port of process 0, the same on every process '
                      '(default: $JAX_COORDINATOR_ADDRESS; not needed on Cloud TPU and SLURM).')
  flags.DEFINE_integer('num_processes', os.environ.get('JAX_NUM_PROCESSES'),
                       'With --distributed: how many processes (default: $JAX_NUM_PROCESSES).')
  flags.DEFINE_integer('process_id', os.environ.get('JAX_PROCESS_ID'),
                       'With --distributed: this process, 0 to num_processes - 1 (default: '
                       '$JAX_PROCESS_ID).')
  flags.DEFINE_integer('initialization_timeout', 300,
                       'With --distributed: seconds to wait for the coordinator and the other '
                       'processes at start-up before stopping with an error.')
  flags.DEFINE_integer('heartbeat_timeout', 100,
                       'With --distributed: seconds after which the other processes stop when '
                       'one has died (a killed host, an out-of-memory kill).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags)
