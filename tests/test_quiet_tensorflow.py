"""TensorFlow's start-up noise stays off stderr; everything else written there is passed on.

What TensorFlow prints at import depends on the processor (the oneDNN banner, the note on CPU
features), so the import is tested on a stand-in `tensorflow` module that writes known noise and a
real line to file descriptor 2, as TensorFlow's C++ code does."""

import pytest

import quiet_tensorflow
from tests.helpers import run_tool

NOISY_TENSORFLOW = '''import os
os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see...\\n")
os.write(2, b"E0000 something real went wrong\\n")
os.write(2, b"To enable the following instructions: AVX2 FMA, rebuild TensorFlow\\n")
'''
IMPORT = 'import quiet_tensorflow; quiet_tensorflow.import_tensorflow(); print("imported")'


@pytest.mark.slow
def test_the_import_drops_the_noise_and_passes_the_rest(tmp_path):
  (tmp_path / 'tensorflow.py').write_text(NOISY_TENSORFLOW)
  out = run_tool('-c', f'import sys; sys.path.insert(0, {str(tmp_path)!r}); {IMPORT}',
                 check=True)
  assert out.stdout == 'imported\n'
  assert out.stderr == 'E0000 something real went wrong\n'


@pytest.mark.slow
def test_the_real_import_prints_none_of_the_noise():
  out = run_tool('-c', f'{IMPORT}; import jax; jax.numpy.zeros(1).block_until_ready()',
                 check=True, env={'PATH': '/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu'})
  assert not any(marker in out.stderr for marker in quiet_tensorflow.NOISE), out.stderr


def test_other_lines_are_passed_on():
  text = ('WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n'
          'I0000 port.cc:153] oneDNN custom operations are on. You may see...\n'
          'E0000 something real went wrong\n')
  assert quiet_tensorflow.without_noise(text) == 'E0000 something real went wrong\n'
