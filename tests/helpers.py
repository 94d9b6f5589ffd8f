"""What the tests share: the project root, the tiny synthetic training config, random weights,
one way to run a tool of this project as a process and to read what a run wrote."""

import json
import os
import subprocess
import sys

import complexity
from configs import default
import models
from models import random_variables  # pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# MobileNet V1 0.25 at 32 px on 64 synthetic examples of 4 classes: 12 steps of batch 16, with
# every feature of the loop on (EMA, label smoothing, augmentation, eval and checkpoints).
TINY_BASE = 'configs/mobilenet_v1.py:alpha=0.25,res=32'
TINY = {
    'dataset': 'synthetic', 'num_classes': 4, 'synthetic_train_examples': 64,
    'synthetic_eval_examples': 20, 'batch_size': 16, 'eval_batch_size': 16,
    'model.dropout_rate': 0.0, 'model.bn_momentum': 0.9, 'num_train_steps': 12,
    'log_every_steps': 2, 'eval_every_steps': 6, 'checkpoint_every_steps': 3,
    'optimizer': 'sgd', 'learning_rate': 0.1, 'lr_reference_batch_size': 0, 'schedule': 'cosine',
    'ema_decay': 0.5, 'label_smoothing': 0.1, 'augment': 'pad_crop', 'crop_padding': 2,
}

TINY_CONFIG_FILE = '''"""The tests' tiny training config (tests/helpers.py: TINY) as a config file."""
from configs import default, mobilenet_v1


def get_config(arg=None):
  del arg
  config = mobilenet_v1.get_config({arg!r})
  for field, value in {settings!r}.items():
    default.set_field(config, field, value)
  return config
'''


def tiny_config(**overrides):
  """The tiny config (TINY) with `overrides` ({'model.alpha': 0.5, ...} as keyword arguments)."""
  from configs import mobilenet_v1  # pylint: disable=g-import-not-at-top
  config = mobilenet_v1.get_config(TINY_BASE.partition(':')[2])
  for field, value in {**TINY, **overrides}.items():
    default.set_field(config, field, value)
  return config


def write_tiny_config_file(path, **overrides) -> str:
  """Writes the tiny config with `overrides` as a config file at `path`; returns the path."""
  with open(path, 'w') as f:
    f.write(TINY_CONFIG_FILE.format(arg=TINY_BASE.partition(':')[2],
                                    settings={**TINY, **overrides}))
  return str(path)


def write_teacher(workdir, ema: bool = False, **overrides) -> str:
  """A distillation teacher's workdir as convert.py writes one: the tiny config's network (with
  `overrides`) with random weights and BatchNorm statistics (so that inference and training
  mode differ), and moving averages with `ema`; returns its path."""
  import convert  # pylint: disable=g-import-not-at-top
  config = tiny_config(ema_decay=0.5 if ema else 0.0, **overrides)
  variables = random_variables(models.get_model(config), config.image_size, seed=7,
                               random_batchnorm=True)
  convert.write_workdir(str(workdir), config, variables, provenance={'source': 'test'})
  return str(workdir)


def train_args(workdir, **overrides) -> list[str]:
  """main.py and its flags for the tiny config with `overrides` (run from ROOT)."""
  args = ['main.py', f'--config={TINY_BASE}', f'--workdir={workdir}']
  return args + [f'--config.{k}={v}' for k, v in {**TINY, **overrides}.items()]


def train_command(workdir, **overrides) -> list[str]:
  """The whole command line of `train_args`, for a process started by other means."""
  return [sys.executable, *train_args(workdir, **overrides)]


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def latest_state(workdir) -> tuple[int, dict]:
  """(step, the checkpoint's TrainState as a dict) of the latest checkpoint in `workdir`."""
  import workdirs  # pylint: disable=g-import-not-at-top
  state, step = workdirs.restore_on_host(workdir)
  return step, state




def run_tool(*args, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
  """Runs `python args...` (a tool of this project and its flags) from ROOT, its output
  captured as text; `kwargs` go to subprocess.run (env, timeout)."""
  return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                        text=True, check=check, **kwargs)


def count(config) -> complexity.Complexity:
  """MAdds and parameters of `config`'s network at its image size."""
  return complexity.analyze(models.get_model(config), config.image_size)
