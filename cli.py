"""What every command-line tool of this project shares: flag parsing that reports a bad flag in
one line, and a console without third-party chatter."""

import logging as python_logging
import re
import sys

from absl import flags
from absl import logging


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for the command-line tools (`app.run(main, flags_parser=...)`) that
  reports a bad flag in one line: a missing config file, a bad argument string, an unknown or
  mistyped --config.field. Returns the arguments that are not flags."""
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS.config is not None:
      flags.FLAGS.config.keys()  # a config file loads, and fails, when it is first used
  except Exception as e:  # pylint: disable=broad-except  # absl and ml_collections raise many kinds
    text = str(e).replace('\\n', '\n').replace("\\'", "'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    unknown = re.search(r"'([\w.]+)'", text)
    if isinstance(e, (AttributeError, KeyError)) and unknown:
      message = f'{unknown.group(1)!r} is not a config field'
      message += f' ({lines[-1].strip(chr(39))})' if len(lines) > 1 else ''
    else:
      message = lines[-1] if lines else type(e).__name__
    raise SystemExit(f'error: bad flag: {message}') from None
  return rest


# Modules whose INFO lines narrate their own work (TFDS constructing data sets, Orbax reporting
# every step of every save): their warnings and errors still show.
CHATTY_MODULES = ('/tensorflow_datasets/', '/orbax/', '/etils/', '/clu/')
# Lines that are noise at any level: JAX's probe for a TPU, TFDS's warnings about its own API and
# about the data set folder it is about to prepare.
NOISE = ("Unable to initialize backend 'tpu'", '`FeatureConnector.dtype` is deprecated',
         'has no dataset_info.json')


def keep_on_console(record: python_logging.LogRecord) -> bool:
  """False for what would bury this program's progress and errors: CHATTY_MODULES' INFO lines,
  NOISE, and asyncio's reports of the writes left over from a failed checkpoint save."""
  if record.levelno < python_logging.WARNING and any(m in record.pathname for m in CHATTY_MODULES):
    return False
  return record.name != 'asyncio' and not any(n in record.getMessage() for n in NOISE)


def without_traceback_of_chatty_modules(record: python_logging.LogRecord) -> bool:
  """Keeps `record`, without the traceback where CHATTY_MODULES attach one to an error they
  report and then raise to us (Orbax's failed checkpoint write): the error we report names it."""
  if record.exc_info and any(m in record.pathname for m in CHATTY_MODULES):
    record.exc_info, record.exc_text = None, None
  return True


def report_unless_closed_event_loop(previous_hook):
  """A sys.unraisablehook that passes every exception to `previous_hook` but RuntimeError('Event
  loop is closed'), which TensorStore reports for each write still under way when a failed
  checkpoint save has closed its event loop (hundreds of tracebacks, interleaved down to pieces of
  words)."""
  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      previous_hook(unraisable)
  return hook


def quiet_console() -> None:
  """Filters absl's console handler (`keep_on_console`, tracebacks of CHATTY_MODULES) and hides
  the reports of a failed checkpoint write's closed event loop."""
  handler = logging.get_absl_handler()
  handler.addFilter(keep_on_console)
  handler.addFilter(without_traceback_of_chatty_modules)
  sys.unraisablehook = report_unless_closed_event_loop(sys.unraisablehook)
