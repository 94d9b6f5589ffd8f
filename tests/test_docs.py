"""Every command in README.md and docs/ runs as written: its script exists, each flag is one the
script defines, and each --config loads with its argument string and --config.FIELD overrides."""

import glob
import os
import re
import shlex

import pytest

from configs import default
import sweep
from tests.helpers import ROOT, run_tool

DOCUMENTS = ['README.md', *sorted(os.path.relpath(p, ROOT)
                                  for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))]
# One of our scripts run by a Python interpreter, anywhere in a line (after environment variables,
# `srun ...` or inside `gcloud ... --command="..."`), up to the end of the line or of the quote.
COMMAND = re.compile(r'(?:^|[\s"])\S*python3? ((?:tools/)?\w+\.py)\b([^"]*)')
# Placeholders a user replaces: shell variables, <...>, and the '...' of an elided value.
PLACEHOLDER = re.compile(r'\$\w+|\$\{\w+\}|<[^>]*>')


def commands_of(document: str) -> list[str]:
  """The lines of `document`'s code blocks that run one of our scripts, continuations joined, a
  trailing comment and shell plumbing after the command (`&`, `;`, pipes) cut."""
  with open(os.path.join(ROOT, document)) as f:
    blocks = re.findall(r'```[^\n]*\n(.*?)```', f.read(), re.S)
  commands = []
  for block in blocks:
    for line in re.sub(r'\\\n\s*', ' ', block).splitlines():
      match = COMMAND.search(re.sub(r'\s+#.*$', '', line.strip()))
      if match:
        command = re.split(r'\s(?:&&|;|\||&)(?:\s|$)', match.group(0))[0]
        commands.append(command.strip(' "'))
  return commands


ALL_COMMANDS = [(document, command) for document in DOCUMENTS
                for command in commands_of(document)]


SCRIPTS = sorted({COMMAND.search(command).group(1) for _, command in ALL_COMMANDS})


def flags_of(script: str) -> frozenset[str]:
  """The flag names `script` defines, from its --helpfull (which absl ends with exit status 1)."""
  out = run_tool(script, '--helpfull', timeout=300)
  names = frozenset(re.findall(r'^\s+--(?:\[no\])?(\w+)', out.stdout, re.M))
  assert 'helpfull' in names, out.stderr[-2000:]
  return names


def test_the_documents_have_commands():
  documents = {document for document, _ in ALL_COMMANDS}
  assert 'README.md' in documents and len(documents) >= 8, documents
  assert len(ALL_COMMANDS) >= 40


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS)
def test_commands_run_as_written(script):
  """Each command of `script` (its --helpfull once for all of them)."""
  assert os.path.isfile(os.path.join(ROOT, script)), f'no {script}'
  defined = flags_of(script)
  for document, command in ALL_COMMANDS:
    if COMMAND.search(command).group(1) == script:
      check_command(document, command, defined)


def check_command(document: str, command: str, defined: frozenset[str]) -> None:
  """AssertionError naming `document` and the problem unless every flag of `command` is in
  `defined` and its --config loads with its argument string and --config.FIELD overrides."""
  script, rest = COMMAND.search(command).groups()
  args = shlex.split(PLACEHOLDER.sub('X', rest))
  config, overrides = None, []
  for arg in args:
    if not arg.startswith('--'):
      continue  # a positional argument: an image file
    name, _, value = arg[2:].partition('=')
    if name.startswith('config.'):
      overrides.append(name[len('config.'):])
      continue
    assert name in defined or (name.startswith('no') and name[2:] in defined), (
        f'{document}: {script} has no flag --{name} ({command})')
    if name == 'config':
      config = value
  if config is None:
    return
  path = config.partition(':')[0]
  assert os.path.isfile(os.path.join(ROOT, path)), f'{document}: no config file {path}'
  loaded = sweep.load_config(config)
  if script == 'sweep.py':
    assert not overrides, f'{document}: sweep.py takes no --config.FIELD ({command})'
    sweep.expand(loaded)
    return
  for field in overrides:
    assert default.get_field(loaded, field) is not None, (
        f'{document}: {field!r} is not a field of {config} ({command})')
