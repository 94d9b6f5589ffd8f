"""TensorFlow's start-up noise stays off stderr; everything else written there is passed on."""

import subprocess
import sys

import pytest

import quiet_tensorflow
from conftest import ROOT

IMPORT = 'import {}; {}import jax; jax.numpy.zeros(1).block_until_ready(); print("imported")'


def _stderr_of(code):
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       check=True, env={'PATH': '/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu'})
  assert out.stdout.strip() == 'imported'
  return out.stderr


@pytest.mark.slow
def test_plain_import_is_noisy_and_the_quiet_one_is_not():
  assert 'oneDNN custom operations are on' in _stderr_of(IMPORT.format('tensorflow', ''))
  quiet = _stderr_of(IMPORT.format('quiet_tensorflow', 'quiet_tensorflow.import_tensorflow(); '))
  assert not any(marker in quiet for marker in quiet_tensorflow.NOISE), quiet


def test_other_lines_are_passed_on():
  text = ('WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n'
          'I0000 port.cc:153] oneDNN custom operations are on. You may see...\n'
          'E0000 something real went wrong\n')
  assert quiet_tensorflow.without_noise(text) == 'E0000 something real went wrong\n'
