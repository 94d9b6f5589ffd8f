"""malloc_tunables.py: the one restart with glibc's malloc tunables, those that help here."""

import os
import sys

import pytest

import malloc_tunables

HEAP_REUSE = ('glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:'
              'glibc.malloc.trim_threshold=4294967296')


@pytest.fixture
def machine(tmp_path, monkeypatch):
  """A fake kernel file for transparent huge pages and fake accelerator device files; returns
  (the kernel file, the directory of device files)."""
  enabled, devices = tmp_path / 'enabled', tmp_path / 'dev'
  devices.mkdir()
  monkeypatch.setattr(malloc_tunables, 'TRANSPARENT_HUGEPAGE', str(enabled))
  monkeypatch.setattr(malloc_tunables, 'ACCELERATOR_DEVICES',
                      tuple(str(devices / name) for name in ('nvidia[0-9]*', 'accel[0-9]*')))
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  return enabled, devices


def tunables() -> str:
  environ = malloc_tunables.environ_with_tunables()
  return None if environ is None else environ['GLIBC_TUNABLES']


def test_restart_once_with_huge_pages_and_heap_reuse_on_a_cpu_machine(machine, monkeypatch):
  enabled, _ = machine
  enabled.write_text('always [madvise] never\n')
  restarts = []
  monkeypatch.setattr(os, 'execve', lambda *args: restarts.append(args))
  malloc_tunables.restart_with_tunables()
  assert restarts == [(sys.executable, sys.orig_argv,
                       {**os.environ, 'GLIBC_TUNABLES': f'glibc.malloc.hugetlb=1:{HEAP_REUSE}'})]
  # The restarted process finds them all set and goes on.
  monkeypatch.setenv('GLIBC_TUNABLES', restarts[0][2]['GLIBC_TUNABLES'])
  malloc_tunables.restart_with_tunables()
  assert len(restarts) == 1


def test_the_users_settings_are_kept(machine, monkeypatch):
  enabled, _ = machine
  enabled.write_text('always [madvise] never\n')
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0')
  assert tunables() == ('glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0:'
                        'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296')


def test_huge_pages_only_where_the_kernel_gives_them_on_request(machine):
  enabled, _ = machine
  for content in ('[always] madvise never', 'always madvise [never]'):
    enabled.write_text(content)
    assert tunables() == HEAP_REUSE
  enabled.unlink()
  assert tunables() == HEAP_REUSE


def test_heap_reuse_only_where_the_step_runs_on_the_cpu(machine, monkeypatch):
  enabled, devices = machine
  enabled.write_text('always [madvise] never\n')
  (devices / 'nvidia0').touch()
  assert tunables() == 'glibc.malloc.hugetlb=1'
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert tunables() == f'glibc.malloc.hugetlb=1:{HEAP_REUSE}'
  (devices / 'nvidia0').unlink()
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu,cpu')
  assert tunables() == 'glibc.malloc.hugetlb=1'
  enabled.unlink()
  assert tunables() is None
