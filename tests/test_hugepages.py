"""hugepages.py: the one restart with glibc's transparent-huge-page tunable, where it helps."""

import os
import sys

import hugepages


def test_restart_with_huge_pages(tmp_path, monkeypatch):
  enabled = tmp_path / 'enabled'
  monkeypatch.setattr(hugepages, 'TRANSPARENT_HUGEPAGE', str(enabled))
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  restarts = []
  monkeypatch.setattr(os, 'execve', lambda *args: restarts.append(args))
  enabled.write_text('always [madvise] never\n')
  hugepages.restart_with_huge_pages()
  assert restarts == [(sys.executable, sys.orig_argv,
                       {**os.environ, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'})]
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2')
  assert hugepages.environ_with_huge_pages()['GLIBC_TUNABLES'] == (
      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')
  # Nothing to do where the user chose a setting, where every mapping gets huge pages already
  # ('always'), where there are none ('never') or no such kernel file.
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=0')
  assert hugepages.environ_with_huge_pages() is None
  monkeypatch.delenv('GLIBC_TUNABLES')
  for content in ('[always] madvise never', 'always madvise [never]'):
    enabled.write_text(content)
    assert hugepages.environ_with_huge_pages() is None
  enabled.unlink()
  assert hugepages.environ_with_huge_pages() is None
  hugepages.restart_with_huge_pages()
  assert len(restarts) == 1
