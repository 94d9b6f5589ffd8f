"""TensorFlow imported without its start-up noise on stderr.

Importing TensorFlow writes, from C++ and before any logging can be configured, lines that say
nothing to a user of this project: the oneDNN banner (once for each of TensorFlow's two
libraries), absl's note that logging is not initialized, and the note on CPU features it was not
built for. `TF_CPP_MIN_LOG_LEVEL` does not reach them. `import_tensorflow` captures what the import
writes to stderr and passes on every other line. It also sets `TF_CPP_MIN_LOG_LEVEL=1` where it is
unset, which keeps TensorFlow's C++ INFO lines (tf.data's notes on buffer sizes) off the console
later; its warnings and errors still show.
"""

import os
import sys
import tempfile

NOISE = (
    'oneDNN custom operations are on',
    'All log messages before absl::InitializeLog() is called',
    'This TensorFlow binary is optimized to use available CPU instructions',
    'To enable the following instructions:',
)


def without_noise(text: str) -> str:
  """`text` without its lines that contain one of NOISE."""
  return ''.join(line for line in text.splitlines(keepends=True)
                 if not any(marker in line for marker in NOISE))


def import_tensorflow() -> None:
  """Imports TensorFlow with stderr captured, then writes what it wrote there less NOISE."""
  if 'tensorflow' in sys.modules:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      sys.stderr.write(without_noise(captured.read().decode(errors='replace')))
      sys.stderr.flush()
