"""Knowledge distillation: Hinton's loss, a frozen teacher inside the pmapped step, its view of
the student's crop, one-line errors for bad teachers and an exact resume of a distilled run."""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import distillation
import input_pipeline
import models
import sweep
import train
import workdirs
from tests.helpers import ROOT, latest_state, tiny_config, train_command, write_teacher


def numpy_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_the_soft_target_loss_is_hintons_with_its_t_squared_scaling():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(0, 3, (2, 5, 7))
  teacher[:, 0] = -np.inf  # a background class the teacher lacks
  for temperature in (1.0, 2.5, 8.0):
    log_p = numpy_log_softmax(teacher / temperature)  # float64
    p = np.exp(log_p)
    expected = temperature**2 * np.sum(p * (np.where(p > 0, log_p, 0.0) - numpy_log_softmax(
        student / temperature)), -1)
    loss = distillation.soft_target_loss(jnp.asarray(student, jnp.float32),
                                         jnp.asarray(teacher, jnp.float32), temperature)
    np.testing.assert_allclose(loss, expected, rtol=2e-6, atol=1e-6)
    # Hinton et al. 2015, equation 2 times T^2: dC/dz_i = T (q_i - p_i), q = softmax(z / T).
    grad = jax.grad(lambda z: distillation.soft_target_loss(
        z, jnp.asarray(teacher, jnp.float32), temperature).sum())(jnp.asarray(student, jnp.float32))
    q = np.exp(numpy_log_softmax(student / temperature))
    np.testing.assert_allclose(grad, temperature * (q - p), rtol=1e-5, atol=1e-6)


def test_a_distilled_step_mixes_in_a_frozen_teachers_soft_targets_on_1_and_8_devices(
    train_state_and_step, tmp_path):
  """The step's loss is (1 - w) * label loss + w * T^2 * KL on the logits of the teacher in
  inference mode at its own size, the same on 8 devices as on 1; the second step sees the same
  teacher (nothing of it is trained or updated)."""
  teacher_dir = write_teacher(tmp_path / 'teacher', **{'model.alpha': 0.5})
  config = tiny_config(**{'distill.teacher': teacher_dir, 'distill.temperature': 3.0,
                          'distill.weight': 0.7, 'distill.teacher_image_size': 48})
  config, teacher, teacher_variables = distillation.load(config)
  data = input_pipeline.load(config)
  batch = next(input_pipeline.train_batches(data, config, 4))
  batch = jax.tree.map(lambda x: x.reshape(16, *x.shape[2:]), batch)
  assert batch['teacher_image'].shape == (16, 48, 48, 3)
  runs, steps = {}, {}
  for n in (8, 1):
    state, step = train_state_and_step(config, jax.local_devices()[:n], teacher=teacher,
                                       teacher_variables=teacher_variables)
    sharded = jax.tree.map(lambda x, n=n: x.reshape(n, -1, *x.shape[1:]), batch)
    states, metrics = [state], []
    for _ in range(2):
      new_state, new_metrics = step(states[-1], sharded)
      states.append(jax.device_get(new_state))
      metrics.append(jax.device_get(new_metrics))
    runs[n], steps[n] = (states, metrics), step
  for a, b in zip(jax.tree.leaves(runs[8][0][1].params), jax.tree.leaves(runs[1][0][1].params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(runs[8][1][0]['loss'], runs[1][1][0]['loss'], rtol=1e-5)
  # The teacher's weights stay on the devices: a step with the state and batch there moves nothing.
  on_devices = train.replicated(runs[8][0][-1]), jax.pmap(lambda x: x)(
      jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), batch))
  with jax.transfer_guard('disallow'):
    jax.block_until_ready(steps[8](*on_devices))

  student = models.get_model(config)  # one device: its batch statistics are the whole batch's
  labels = batch['label'] + config.label_offset
  teacher_pixels = input_pipeline.normalize(batch['teacher_image'].astype(np.float32),
                                            teacher.config)
  teacher_logits = np.asarray(teacher.network.apply(teacher_variables, teacher_pixels,
                                                    train=False), np.float64)
  states, metrics = runs[1]
  for state, values in zip(states, metrics):
    logits, _ = student.apply(
        {'params': state.params, 'batch_stats': state.batch_stats},
        input_pipeline.normalize(batch['image'].astype(np.float32), config), train=True,
        mutable=['batch_stats'])
    logits = np.asarray(logits, np.float64)
    targets = optax.smooth_labels(np.eye(4)[labels], config.label_smoothing)
    label_loss = -np.mean(np.sum(targets * numpy_log_softmax(logits), -1))
    log_p = numpy_log_softmax(teacher_logits / 3.0)
    soft_loss = 9.0 * np.mean(np.sum(np.exp(log_p) * (log_p - numpy_log_softmax(logits / 3.0)),
                                     -1))
    np.testing.assert_allclose(values['label_loss'], label_loss, rtol=1e-5)
    np.testing.assert_allclose(values['soft_loss'], soft_loss, rtol=1e-5)
    np.testing.assert_allclose(values['loss'], 0.3 * label_loss + 0.7 * soft_loss, rtol=1e-5)
  assert metrics[0]['soft_loss'] != metrics[1]['soft_loss']  # the student moved between them


def test_a_1001_class_teacher_teaches_1000_classes_and_back(tmp_path):
  """As label_offset: a teacher with a background logit first drops it for a student without
  one; a student with one gets probability 0 there from a teacher without it."""
  with_background = write_teacher(tmp_path / 'background', num_classes=5, label_offset=1)
  plain = write_teacher(tmp_path / 'plain')
  pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
  for teacher_dir, student, kept in ((with_background, {}, slice(1, None)),
                                     (plain, {'num_classes': 5, 'label_offset': 1}, slice(None))):
    config, teacher, variables = distillation.load(tiny_config(**{
        'distill.teacher': teacher_dir, **student}))
    own = teacher.network.apply(variables, input_pipeline.normalize(
        pixels.astype(np.float32), teacher.config), train=False)
    logits = np.asarray(teacher.logits(variables, pixels))
    assert logits.shape == (2, config.num_classes)
    np.testing.assert_array_equal(logits[:, -4:], np.asarray(own)[:, kept])
    if config.label_offset:
      assert np.all(logits[:, 0] == -np.inf)
      assert np.all(np.isfinite(distillation.soft_target_loss(
          np.zeros_like(logits), logits, config.distill.temperature)))


def test_the_teacher_sees_the_students_crop_at_its_own_size():
  """The teacher's view of an 'inception_crop' example is the student's crop (same window, same
  flip) resized to the teacher's size: what a student at that size would have seen."""
  image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)
  example = {'image': image, 'label': 1}
  seed, draws = np.array([3, 4], np.int64), np.array([0.1, 0.9, 0.2], np.float32)
  def views(**overrides):
    config = tiny_config(augment='inception_crop', **overrides)
    return input_pipeline.preprocess_train(example, seed, draws, config)
  distilled = views(**{'distill.teacher': 'some/teacher', 'distill.teacher_image_size': 48})
  assert set(views()) == {'image', 'label'}
  np.testing.assert_array_equal(distilled['image'], views()['image'])
  np.testing.assert_array_equal(distilled['teacher_image'], views(image_size=48)['image'])
  at_student_size = views(**{'distill.teacher': 'some/teacher', 'distill.teacher_image_size': 32})
  assert 'teacher_image' not in at_student_size


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
  root = tmp_path_factory.mktemp('teachers')
  return {'plain': write_teacher(root / 'plain'), 'ema': write_teacher(root / 'ema', ema=True),
          'ten_classes': write_teacher(root / 'ten', num_classes=10)}


def misfit_teacher(teachers, tmp_path):
  """A teacher whose config.json names a wider network than its checkpoint holds."""
  path = tmp_path / 'misfit'
  shutil.copytree(teachers['plain'], path)
  saved = json.loads((path / 'config.json').read_text())
  saved['model']['alpha'] = 0.5
  (path / 'config.json').write_text(json.dumps(saved))
  return str(path)


@pytest.mark.parametrize('settings, message', [
    ({'distill.temperature': 0.0}, r'distill.temperature must be > 0, got 0.0\.'),
    ({'distill.weight': 1.5}, r'distill.weight must be in \[0, 1\], got 1.5\.'),
    ({'distill.teacher': 'missing'}, r'distill.teacher: missing has no config.json: it is not a '
                                     r'workdir of main.py or convert.py\.'),
    ({'distill.teacher': 'plain', 'distill.teacher_ema': True},
     'distill.teacher=.* kept no moving averages: set distill.teacher_ema=False'),
    ({'distill.teacher': 'ten_classes'}, 'distill.teacher=.* predicts 10 classes .* this run 4 '
                                         '.* the teacher must know the same classes'),
    ({'distill.teacher': 'plain', 'distill.teacher_image_size': 30},
     'distill.teacher=.* cannot be built: .*image_size'),
    ({'distill.teacher': 'misfit'}, r'The checkpoint in distill.teacher=.* does not fit the '
                                    r'network of its config.json: (params|batch_stats)/.* differ'),
])
def test_a_bad_teacher_is_one_line_before_compiling(teachers, tmp_path, monkeypatch, settings,
                                                   message):
  teacher = settings.get('distill.teacher')
  if teacher in teachers:
    settings = {**settings, 'distill.teacher': teachers[teacher]}
  elif teacher == 'misfit':
    settings = {**settings, 'distill.teacher': misfit_teacher(teachers, tmp_path)}
  def compile_anything(*args, **kwargs):
    raise AssertionError('compiled before the bad setting was reported')
  for name in ('jit', 'pmap'):
    monkeypatch.setattr(jax, name, compile_anything)
  with pytest.raises(ValueError, match=message) as error:
    train.train_and_evaluate(tiny_config(**settings), str(tmp_path / 'run'))
  assert '\n' not in str(error.value)
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_a_resumed_run_refuses_another_teacher_and_accepts_the_same_one_moved(teachers,
                                                                               tmp_path):
  config = tiny_config(**{'distill.teacher': teachers['plain']})
  started, _, _ = distillation.load(config)
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  workdirs.write_config(workdir, started, {}, 0)
  other = write_teacher(tmp_path / 'other', **{'model.alpha': 0.5})
  with pytest.raises(ValueError, match=(
      r'The weights of the teacher distill.teacher=.*other \(checksum [0-9a-f]{16}\) are not '
      r'those the run in .* started with \([0-9a-f]{16}\): give it that teacher, or use a new '
      r'--workdir\.')):
    workdirs.resume_changes(workdir, distillation.load(tiny_config(**{
        'distill.teacher': other}))[0])
  moved = str(tmp_path / 'moved')
  os.rename(teachers['plain'], moved)
  try:
    changes = workdirs.resume_changes(workdir, distillation.load(tiny_config(**{
        'distill.teacher': moved}))[0])
  finally:
    os.rename(moved, teachers['plain'])
  assert changes == {'distill.teacher': [teachers['plain'], moved]}
  with pytest.raises(ValueError, match=r"holds a run with distill.teacher='.*plain', this "
                                       r"config has distill.teacher=''"):
    workdirs.resume_changes(workdir, tiny_config())


def test_sweeps_name_the_teacher_by_its_folder(teachers):
  config = tiny_config(**{'distill.teacher': teachers['plain'] + '/', 'distill.temperature': 2.0})
  fields = ['seed', 'distill.teacher', 'distill.temperature']
  assert sweep.run_name(config, fields) == 'mobilenet_v1-a0.25-r32-seed0-kd_plain-T2'
  assert sweep.run_name(tiny_config(), fields) == 'mobilenet_v1-a0.25-r32-seed0-kd_none-T4'
  assert sweep.variant(config) == 'teacher=plain'  # a family of its own in tables and plots
  assert sweep.variant(tiny_config(**{'model.separable': False})) == 'separable=False'


@pytest.mark.slow
def test_a_killed_distilled_run_resumes_bit_identically(teachers, tmp_path):
  settings = {'distill.teacher': teachers['ema'], 'distill.teacher_ema': True,
              'distill.teacher_image_size': 48}
  reference = str(tmp_path / 'reference')
  train.train_and_evaluate(tiny_config(**settings), reference)
  workdir = tmp_path / 'run'
  process = subprocess.Popen(train_command(workdir, **settings), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  checkpoints = workdir / 'checkpoints'
  deadline = time.time() + 300  # a hang guard, far above the ~20 s this takes
  while not (checkpoints.is_dir() and '3' in os.listdir(checkpoints)):
    assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert not os.path.exists(workdir / 'results.json'), 'killed too late'
  train.train_and_evaluate(tiny_config(**settings), str(workdir))
  (step, state), (reference_step, expected) = latest_state(workdir), latest_state(reference)
  assert step == reference_step == 12
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  def history(path):
    return [(l['step'], l['split'], l.get('soft_loss'), l['loss']) for l in map(
        json.loads, open(os.path.join(path, 'metrics.jsonl')))]
  assert history(workdir) == history(reference)
  assert history(reference)[0][2] > 0
  saved = workdirs.read_config(str(workdir))['distill']
  assert saved['teacher_checksum'] == distillation.checksum(
      workdirs.load_for_inference(teachers['ema'], ema=True)[1])
  # The student is an ordinary workdir for evaluation and inference (predict.py, export.py).
  evaluated = train.train_and_evaluate(tiny_config(eval_only=True), str(workdir))
  assert evaluated['step'] == 12 and evaluated['top1'] == pytest.approx(
      workdirs.read_results(str(workdir))['final_top1'])
  config, variables = workdirs.load_for_inference(str(workdir))
  assert config.distill.teacher == teachers['ema'] and set(variables) == {'params', 'batch_stats'}
