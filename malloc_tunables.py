"""glibc malloc tunables for XLA's CPU runtime, set by restarting the process once at start-up.

XLA's CPU runtime allocates every step's temporary buffer afresh (180 MB for the quickstart's
step). glibc maps an allocation that large from the kernel and unmaps it when it is freed, so every
step faults its buffers in again, and the kernel zeroes each page first: a fifth to a quarter of a
CPU step. Two remedies, asked for through GLIBC_TUNABLES before the process starts:

- `glibc.malloc.hugetlb=1` (where the kernel gives transparent huge pages on request): the pages
  are 2 MiB, not 4 KiB, so there are few faults.
- Where the train step runs on the CPU (no GPU or TPU device file): `glibc.malloc.mmap_max=0`,
  `glibc.malloc.arena_max=1` and a `glibc.malloc.trim_threshold` of 4 GiB keep freed memory in the
  heap for the next step, so there are no faults at all. The process keeps its peak memory. On
  machines with accelerators the one arena would serialize the input pipeline's many threads, and
  XLA's step buffers are not on the host, so these three are left out there.

A tunable that GLIBC_TUNABLES names already is left as it is: set, for example,
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0:glibc.malloc.arena_max=8` to opt out of both.
"""

import glob
import os
import platform
import sys
from typing import Optional

HUGE_PAGES = {'glibc.malloc.hugetlb': '1'}
HEAP_REUSE = {'glibc.malloc.mmap_max': '0', 'glibc.malloc.arena_max': '1',
              'glibc.malloc.trim_threshold': str(4 << 30)}
TRANSPARENT_HUGEPAGE = '/sys/kernel/mm/transparent_hugepage/enabled'
# Device files of GPUs and TPUs (TPU VMs up to v4: accel; later: vfio).
ACCELERATOR_DEVICES = ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')


def huge_pages_on_request() -> bool:
  """Whether the kernel gives transparent huge pages to mappings that ask for them ('madvise')."""
  try:
    with open(TRANSPARENT_HUGEPAGE) as f:
      return '[madvise]' in f.read()
  except OSError:
    return False


def trains_on_cpu() -> bool:
  """Whether JAX will compute on the CPU: JAX_PLATFORMS puts 'cpu' first, or, where it is unset,
  no accelerator's device file is there."""
  if os.environ.get('JAX_PLATFORMS'):
    return os.environ['JAX_PLATFORMS'].split(',')[0] == 'cpu'
  return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def environ_with_tunables() -> Optional[dict[str, str]]:
  """The environment with the tunables that help here added to GLIBC_TUNABLES; None where this is
  not glibc or every one of them is set already or does not apply."""
  if platform.libc_ver()[0] != 'glibc':
    return None
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  chosen = {entry.split('=')[0] for entry in tunables.split(':')}
  wanted = {**(HUGE_PAGES if huge_pages_on_request() else {}),
            **(HEAP_REUSE if trains_on_cpu() else {})}
  added = [f'{name}={value}' for name, value in wanted.items() if name not in chosen]
  if not added:
    return None
  return {**os.environ, 'GLIBC_TUNABLES': ':'.join(filter(None, [tunables, *added]))}


def restart_with_tunables() -> None:
  """Runs this command again, in place, with the tunables of `environ_with_tunables` where any is
  missing."""
  environ = environ_with_tunables()
  if environ is not None:
    os.execve(sys.executable, sys.orig_argv, environ)
