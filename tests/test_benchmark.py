"""benchmark.py and tools/compare_pytorch.py on the command line, as users run them."""

import json

import pytest

from tests.helpers import run_tool, write_teacher


@pytest.mark.slow
def test_benchmark_command_times_train_and_eval_steps_and_the_teachers_cost(tmp_path):
  teacher = write_teacher(tmp_path / 'teacher', **{'model.alpha': 0.5})
  out = run_tool('benchmark.py', '--config=configs/mobilenet_v1.py:alpha=0.25,res=32',
                 '--config.batch_size=8', '--config.eval_batch_size=8', '--config.num_classes=4',
                 f'--config.distill.teacher={teacher}', '--steps=2', '--warmup=1', '--json',
                 check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['device_count'] == 8 and result['batch_size'] == 8
  assert result['train_images_per_sec'] > 0 and result['eval_images_per_sec'] > 0
  assert result['teacher'] == teacher and result['train_step_ms_without_teacher'] > 0
  assert result['teacher_step_ratio'] == pytest.approx(
      result['train_step_ms'] / result['train_step_ms_without_teacher'])


@pytest.mark.slow
def test_compare_pytorch_times_both_sides_the_parts_and_the_profile():
  out = run_tool('tools/compare_pytorch.py', '--rows=v2_0.5_32', '--steps=2', '--warmup=1',
                 '--rounds=1', '--json', '--parts', '--profile', check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['row'] == 'MobileNet V2 0.5, 32 px' and result['batch_size'] == 128
  ours, theirs = result['ours_images_per_sec'], result['pytorch_images_per_sec']
  # One round: the median of the rounds' ratios is that round's ratio.
  assert ours > 0 and theirs > 0 and result['ratio'] == pytest.approx(ours / theirs)
  # pytorchcv's MobileNet V2 0.5: the first stride-1 depthwise convolution is the first block's,
  # 16x16 at 32 px with 16 channels (32 x 0.5).
  assert result['depthwise_shape'] == [128, 16, 16, 16]
  assert result['ours_forward_ms'] > 0 and result['pytorch_depthwise_ms'] > 0
  # Both profiles name every part, and ours finds its convolutions and BatchNorms in the HLO.
  for side in ('ours_profile_ms', 'pytorch_profile_ms'):
    profile = result[side]
    assert set(profile) == {'step', 'forward convolutions', 'forward BatchNorm and activations',
                            'backward convolutions', 'backward BatchNorm and activations',
                            'head, loss, optimizer and the rest'}, side
    assert profile['step'] > 0 and all(
        profile[part] > 0 for part in profile if 'convolutions' in part or 'BatchNorm' in part), (
            side, profile)


@pytest.mark.slow
@pytest.mark.parametrize('command,message', [
    (['tools/compare_pytorch.py', '--rows=v3_1.0_224'], "Unknown rows ['v3_1.0_224']"),
    (['tools/compare_pytorch.py', '--rounds=0'], '--steps and --rounds must be at least 1'),
    (['benchmark.py', '--config=configs/mobilenet_v1.py', '--warmup=-1'],
     '--warmup at least 0'),
    (['tools/make_imagenet_like.py', '--data_dir=UNUSED', '--validation_examples=0'],
     '--validation_examples must be at least 1'),
])
def test_bad_arguments_are_one_error(tmp_path, command, message):
  command = [part.replace('UNUSED', str(tmp_path / 'data')) for part in command]
  out = run_tool(*command)
  assert out.returncode != 0 and message in out.stderr
  assert not (tmp_path / 'data').exists()
