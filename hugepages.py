"""Transparent huge pages for XLA's CPU runtime, asked for by restarting the process once.

XLA's CPU runtime allocates every step's temporary buffer afresh (180 MB for the quickstart's
step) and glibc maps it from the kernel each time; faulting it in 4 KiB pages takes about a
quarter of a CPU step. With HUGE_PAGES_TUNABLE set at process start, glibc asks for transparent
huge pages instead. Set `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to opt out.
"""

import os
import platform
import sys
from typing import Optional

HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
TRANSPARENT_HUGEPAGE = '/sys/kernel/mm/transparent_hugepage/enabled'


def environ_with_huge_pages() -> Optional[dict[str, str]]:
  """The environment plus HUGE_PAGES_TUNABLE; None if glibc.malloc.hugetlb is set already (to
  anything) or this is not glibc on a kernel that gives huge pages on request."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables or platform.libc_ver()[0] != 'glibc':
    return None
  try:
    with open(TRANSPARENT_HUGEPAGE) as f:
      if '[madvise]' not in f.read():
        return None
  except OSError:
    return None
  return {**os.environ, 'GLIBC_TUNABLES': ':'.join(filter(None, [tunables, HUGE_PAGES_TUNABLE]))}


def restart_with_huge_pages() -> None:
  """Runs this command again, in place, with HUGE_PAGES_TUNABLE where it is missing and helps."""
  environ = environ_with_huge_pages()
  if environ is not None:
    os.execve(sys.executable, sys.orig_argv, environ)
