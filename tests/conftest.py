"""Test set-up: eight simulated CPU devices (set before jax is imported), a persistent
compilation cache shared by the test processes, quiet TensorFlow, and the fixtures that build a
train state and its pmapped step and train the tiny config once. The helpers the tests share are
in tests/helpers.py.

`pytest -m "not slow"` leaves out the tests that start main.py, sweep.py or another tool as a
process."""

import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(),
                                                                'mobilenets-test-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def train_state_and_step():
  """A function of (config, devices=None, **teacher) giving a fresh host TrainState of the
  config's model and its train step pmapped over `devices` (all local devices by default), with
  the distillation `teacher` and `teacher_variables` where given."""
  import jax  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import optimizers  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top

  def build(config, devices=None, **teacher):
    train.check_config(config)
    schedule = optimizers.create_schedule(config, 4, config.num_train_steps)
    state = train.create_train_state(config, models.get_model(config, axis_name='batch'),
                                     optimizers.create_optimizer(config, schedule))
    return jax.device_get(state), train.pmap_train_step(config, schedule, devices, **teacher)
  return build


@pytest.fixture(scope='session')
def uninterrupted(tmp_path_factory):
  """(workdir, results) of the tiny config trained for its 12 steps without interruption: the
  reference that resumed and faulted runs must reproduce. Do not modify it; copy it."""
  import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  return workdir, train.train_and_evaluate(tiny_config(), workdir)
