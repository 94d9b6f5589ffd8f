r"""Width/resolution sweeps: expand, run (resumably), collect and plot accuracy against MAdds.

A sweep file in configs/sweeps/ lists groups of points; each group names a base config (a file
with an optional argument string) and axes of config fields to vary, combined as a product or
zipped. Every point trains with its own `main.py` run in `DIR/<run name>/`.

  python sweep.py --config=configs/sweeps/quickstart.py --workdir=runs/sweep
  python sweep.py --config=configs/sweeps/mobilenet_v1_paper.py --workdir=DIR --dry_run
  python sweep.py --config=configs/sweeps/shufflenet_paper.py --workdir=DIR --complexity_only
  python sweep.py --config=configs/sweeps/every_network.py --workdir=DIR --latency_only
  python sweep.py --config=configs/sweeps/mobilenet_v1_paper.py --workdir=DIR --launch=slurm \
      --max_parallel=4 --slurm_gpus_per_node=8
  python sweep.py --collect=DIR

A point with `results.json` is finished and skipped; an interrupted one resumes from its
checkpoint (main.py does that); a failed one is reported and the sweep goes on. Points run one
after another here or on a TPU slice (--launch=tpu), and in parallel as a Slurm job array
(--launch=slurm, slurm_launch.py). Every sweep ends by writing DIR/results.csv, DIR/results.md
and DIR/accuracy_vs_madds.{png,svg}; --complexity_only and --latency_only (untrained LiteRT
files, timed) fill them without training. DIR may be a Cloud Storage folder (gs://), as every
workdir may (workdirs.py).
"""

import collections
import csv
import dataclasses
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Optional

import quiet_tensorflow

if __name__ == '__main__':
  quiet_tensorflow.import_tensorflow()  # before anything imports it with its start-up banners

from absl import app
from absl import flags
from etils import epath
import ml_collections
from ml_collections import config_flags

import cli
import complexity
from configs import default
import distillation
import malloc_tunables
import models
import slurm_launch
import workdirs

ROOT = os.path.dirname(os.path.abspath(__file__))
PUBLISHED = os.path.join(ROOT, 'configs', 'sweeps', 'published.csv')
COLUMNS = ('run', 'model', 'alpha', 'groups', 'image_size', 'variant', 'macs', 'params', 'top1',
           'top5', 'ema_top1', 'train_images_per_sec', 'wall_time_sec', 'compile_sec', 'eval_sec',
           'checkpoint_sec', 'status', 'paper_label', 'paper_madds_millions',
           'paper_params_millions', 'paper_top1',
           'latency_ms', 'int8_latency_ms', 'int8_top1', 'tflite_bytes', 'int8_tflite_bytes',
           'latency_cpu')
EXPORT_DIR = 'export'  # DIR/<run>/export/: the LiteRT files of --export and export.json
# DIR/latency/<run>/: the untrained LiteRT files of --latency_only and latency.json
LATENCY_DIR = 'latency'
# Varied fields left out of run names: paths, which follow from the settings that are named.
UNNAMED_FIELDS = ('init_from',)
SEED_PART = re.compile(r'-seed\d+')
IDENTITY = ('dataset', 'model', 'alpha', 'groups', 'image_size', 'variant')
# Short names of the usual axes in run names; other fields use their last path component.
SHORT_NAMES = {'model.alpha': 'a', 'model.groups': 'g', 'image_size': 'r',
               'model.channel_shuffle': 'shuffle', 'model.se_reduction': 'se',
               'model.bottleneck_activation': 'bottleneck_', 'model.shortcut': 'shortcut_',
               'model.version': 'v', 'model.bypass': 'bypass_',
               'distill.teacher': 'kd_', 'distill.temperature': 'T', 'distill.weight': 'kdw',
               'distill.teacher_ema': 'kd_ema', 'distill.teacher_image_size': 'kd_r'}
# Varied paths named by their last component ('none' where empty): 'kd_none', 'kd_teacher'.
PATH_FIELDS = ('distill.teacher',)


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: a base config (file[:args]) and field overrides."""
  name: str
  base: str
  overrides: tuple[tuple[str, Any], ...]

  def config(self) -> ml_collections.ConfigDict:
    config = load_config(self.base)
    for field, value in self.overrides:
      set_field(config, field, value)
    return config

  def command(self, workdir: str, python: str = 'python', distributed: bool = False) -> list[str]:
    """The main.py command line of this point (run from the repository root)."""
    args = [python, 'main.py', f'--config={self.base}']
    args += [f'--config.{field}={value}' for field, value in self.overrides]
    args += [f'--workdir={os.path.join(workdir, self.name)}']
    return args + (['--distributed'] if distributed else [])


def _format(value) -> str:
  return f'{value:g}' if isinstance(value, float) else str(value)


def load_config(base: str) -> ml_collections.ConfigDict:
  """Loads 'configs/x.py[:args]' (relative to the repository root) as --config would."""
  path, _, arg = base.partition(':')
  full_path = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.isfile(full_path):
    raise ValueError(f'Sweep base config {path!r} does not exist (looked in {full_path}).')
  spec = importlib.util.spec_from_file_location(f'sweep_base_{abs(hash(full_path))}', full_path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, ROOT)
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(ROOT)
  return module.get_config(arg) if arg else module.get_config()


def set_field(config: ml_collections.ConfigDict, field: str, value) -> None:
  try:
    default.set_field(config, field, value)
  except ValueError as e:
    raise ValueError(f'Sweep axis {e}') from None


def run_name(config: ml_collections.ConfigDict, fields) -> str:
  """'mobilenet_v2-a0.5-r160', 'shufflenet-g3-a0.5-r224', 'squeezenet-v1.1-a1-r227', plus any
  other varied field except UNNAMED_FIELDS (characters other than letters, digits, '.' and '_'
  become '_'; PATH_FIELDS by their last component)."""
  identity = ['model.alpha', 'image_size']
  if config.model.name == 'shufflenet':
    identity.insert(0, 'model.groups')
  if config.model.name == 'squeezenet':
    identity.insert(0, 'model.version')
  parts = [config.model.name]
  for field in identity + [f for f in fields if f not in identity + list(UNNAMED_FIELDS)]:
    short_name = SHORT_NAMES.get(field, field.split('.')[-1])
    value = _format(default.get_field(config, field))
    if field in PATH_FIELDS:
      value = folder_name(value) or 'none'
    value = re.sub(r'[^\w.]', '_', value)
    parts.append(f'{short_name}{value}')
  return '-'.join(parts)


def folder_name(path: str) -> str:
  """The last component of `path` ('' for '')."""
  return os.path.basename(path.rstrip('/'))


def variant(config: ml_collections.ConfigDict) -> str:
  """The ablation settings in which `config`'s network differs from the paper's main network,
  and the teacher of a distilled run by its folder, as 'field=value' joined by ';' ('' for the
  main network trained on labels): 'separable=False', 'teacher=distill_teacher'."""
  parts = [f'{field}={value}' for field, value in default.changed_ablations(config.model).items()]
  if config.distill.teacher:
    parts.append(f'teacher={folder_name(config.distill.teacher)}')
  return ';'.join(parts)


def identity(config: ml_collections.ConfigDict) -> dict:
  """What a point is, for tables and for matching the papers' rows: IDENTITY's fields."""
  return {'dataset': config.dataset, 'model': config.model.name, 'alpha': config.model.alpha,
          'groups': config.model.get('groups'), 'image_size': config.image_size,
          'variant': variant(config)}


def expand(sweep: ml_collections.ConfigDict) -> list[Point]:
  """All points of `sweep`, in order; raises ValueError for a bad axis or a duplicate point."""
  points = []
  for group in sweep.groups:
    fields = [field for field, _ in group.axes]
    values = [list(v) for _, v in group.axes]
    if group.get('mode', 'product') == 'zip':
      if len({len(v) for v in values}) > 1:
        raise ValueError(f'Zipped axes {fields} of {group.base} have different lengths '
                         f'{[len(v) for v in values]}; give every axis the same number of values.')
      combos = list(zip(*values))
    elif group.get('mode', 'product') == 'product':
      combos = list(itertools.product(*values))
    else:
      raise ValueError(f"Sweep group mode must be 'product' or 'zip', got {group.mode!r}.")
    for combo in combos:
      overrides = tuple(sweep.get('overrides', ())) + tuple(zip(fields, combo))
      point = Point('', group.base, overrides)
      config = point.config()
      points.append(dataclasses.replace(point, name=run_name(config, fields)))
  seen = {}
  for point in points:
    if point.name in seen:
      raise ValueError(f'Duplicate sweep point {point.name!r} ({seen[point.name].base} and '
                       f'{point.base}): every point needs its own settings; remove one.')
    seen[point.name] = point
  return points


def check_points(points: list[Point]) -> None:
  """Builds every point's model (and reads its distillation teacher) once, so that a bad setting
  stops the sweep before any training."""
  for point in points:
    try:
      config = point.config()
      models.get_model(config)
      if config.distill.teacher:
        distillation.read_teacher(config)
    except ValueError as e:
      raise ValueError(f'Sweep point {point.name}: {e}') from e


def check_workdir(points: list[Point], workdir: str) -> None:
  """Stops a sweep whose points already ran in `workdir` with other settings, which would
  otherwise be skipped or resumed as if they were this sweep's."""
  for point in points:
    run_dir = os.path.join(workdir, point.name)
    changed = workdirs.config_differences(run_dir, point.config())
    if changed:
      raise ValueError(
          f'{run_dir} holds a run of {point.name} with other settings '
          f'({", ".join(changed)}): use a new --workdir, or the sweep file that made it.')


def status(run_dir: str) -> str:
  """'done' (results.json with a final evaluation), 'failed', 'interrupted' or 'pending'."""
  results = workdirs.read_results(run_dir)
  if results is not None:
    return 'done' if results.get('final_top1') is not None else 'failed'
  if (workdirs.path_of(run_dir) / 'FAILED').exists():
    return 'failed'
  if (workdirs.path_of(run_dir) / 'checkpoints').is_dir():
    return 'interrupted'
  return 'pending'


def run_point(point: Point, workdir: str, command: list[str]) -> str:
  """Runs `command` for `point` unless it has finished; its output goes to train.log."""
  run_dir = os.path.join(workdir, point.name)
  if status(run_dir) == 'done':
    return 'skipped (done)'
  return outcome(run_dir, run_command(command, run_dir))


def run_command(command: list[str], run_dir: str, log_name: str = 'train.log') -> int:
  """Runs `command` (a main.py run of `run_dir`) from the repository root with its output
  appended to `run_dir`/`log_name` (on object storage, which has no appends, uploaded when the
  run ends); returns its exit status. A FAILED mark of an earlier attempt goes first."""
  run_path = workdirs.path_of(run_dir)
  run_path.mkdir(parents=True, exist_ok=True)
  (run_path / 'FAILED').unlink(missing_ok=True)
  log_path = run_path / log_name
  local = workdirs.is_local(run_dir)
  with open(log_path, 'a') if local else tempfile.TemporaryFile('w+') as log:
    returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env=malloc_tunables.environ_with_tunables())
    if not local:
      log.seek(0)
      earlier = log_path.read_text() if log_path.exists() else ''
      workdirs.write_atomic(log_path, earlier + log.read())
  return returncode


def outcome(run_dir: str, returncode: int) -> str:
  """'done' if the run in `run_dir` ended with status 0 and a final evaluation; otherwise
  'failed (...)', marked by a FAILED file there."""
  if returncode != 0 or status(run_dir) != 'done':
    workdirs.write_atomic(workdirs.path_of(run_dir) / 'FAILED', f'exit status {returncode}\n')
    return f'failed (exit status {returncode}; see {run_dir}/train.log)'
  return 'done'


def save_plan(points: list[Point], workdir: str, complexities: Optional[dict] = None,
              published: tuple[str, ...] = ()) -> None:
  """DIR/sweep.json: the points (and MAdds/params when known) and the sources of the papers' rows
  of other networks to show beside them (`published`), so --collect needs no config."""
  workdirs.path_of(workdir).mkdir(parents=True, exist_ok=True)
  path = workdirs.path_of(workdir) / 'sweep.json'
  old = {}
  if path.exists():
    old = {p['name']: p for p in json.loads(path.read_text())['points']}
  plan = []
  for point in points:
    entry = {'name': point.name, 'base': point.base, 'overrides': list(point.overrides)}
    known = (complexities or {}).get(point.name) or old.get(point.name, {}).get('complexity')
    if known:
      entry['complexity'] = known
    entry['identity'] = identity(point.config())
    plan.append(entry)
  workdirs.write_json_atomic(path, {'points': plan, 'published': list(published)})


def read_plan(workdir: str) -> list[dict]:
  """The points of DIR/sweep.json; ValueError where there is none."""
  plan_path = workdirs.path_of(workdir) / 'sweep.json'
  if not plan_path.exists():
    raise ValueError(f'{workdir} has no sweep.json: it is not a sweep directory of sweep.py.')
  points = json.loads(plan_path.read_text())['points']
  if any(set(IDENTITY) - set(p.get('identity', {})) for p in points):
    raise ValueError(f'{plan_path} was written by an earlier version of sweep.py: run the sweep '
                     'in a new --workdir, or collect this one with the version that wrote it.')
  return points


def check_published_sources(sources) -> None:
  """ValueError for a sweep's `published` source that no row of published.csv has."""
  known = {part for row in read_published() for part in source_parts(row)}
  unknown = [source for source in sources if source not in known]
  if unknown:
    raise ValueError(f'The sweep\'s published source {unknown[0]!r} is not a source of '
                     f'{PUBLISHED}; its sources are: {", ".join(sorted(known))}.')


def source_parts(row: dict) -> list[str]:
  """The tables a row of published.csv comes from ('MobileNet V1 Table 9; SqueezeNet Table 2')."""
  return [part.strip() for part in row['source'].split(';')]


def paper_only_rows(workdir: str, plan: list[dict]) -> list[dict]:
  """Rows of published.csv whose source the sweep lists in `published` and that match none of its
  points (the papers' rows of networks not built here): status 'published', paper columns only."""
  sources = json.loads((workdirs.path_of(workdir) / 'sweep.json').read_text()).get('published', [])
  points = {_published_key(entry['identity']) for entry in plan}
  rows = []
  for paper in read_published():
    if set(source_parts(paper)) & set(sources) and _published_key(paper) not in points:
      row = dict.fromkeys(COLUMNS)
      row.update(run='', model=paper['model'], alpha=float(paper['alpha']),
                 groups=int(paper['groups']) if paper['groups'] else None,
                 image_size=int(paper['image_size']), variant=paper['variant'], status='published',
                 **paper_columns(paper))
      rows.append(row)
  return rows


def paper_columns(paper: dict) -> dict:
  return dict(paper_label=paper['label'], paper_madds_millions=_number(paper['madds_millions']),
              paper_params_millions=_number(paper['params_millions']),
              paper_top1=_number(paper['top1']))


def collect(workdir: str) -> list[dict]:
  """Writes DIR/results.csv, DIR/results.md and the plots; returns the rows. A point's status is
  done, failed, interrupted or pending, or queued or running while its Slurm job is there; the
  papers' rows of other networks that the sweep lists come last, as 'published'."""
  plan = read_plan(workdir)
  published = {_published_key(p): p for p in read_published()}
  in_queue = slurm_launch.point_queue_states(workdir) if workdirs.is_local(workdir) else {}
  rows = []
  for entry in plan:
    run_dir = os.path.join(workdir, entry['name'])
    row = dict.fromkeys(COLUMNS)
    point = entry['identity']
    row.update(run=entry['name'], status=status(run_dir),
               **{k: point[k] for k in IDENTITY if k != 'dataset'})
    if row['status'] != 'done' and entry['name'] in in_queue:
      row['status'] = in_queue[entry['name']]
    row.update(entry.get('complexity', {}))
    paper = published.get(_published_key(point))
    if paper:
      row.update(paper_columns(paper))
    if row['status'] == 'done':
      results = workdirs.read_results(run_dir)
      row.update(macs=results['macs'], params=results['params'], top1=results['final_top1'],
                 top5=results['final_top5'], ema_top1=results['final_ema_top1'],
                 train_images_per_sec=results['train_images_per_sec'],
                 wall_time_sec=results['wall_time_sec'],
                 **{k: results.get(k) for k in ('compile_sec', 'eval_sec', 'checkpoint_sec')})
    # A trained point's export, else the untrained files' latency of --latency_only.
    exported = workdirs.path_of(run_dir) / EXPORT_DIR / 'export.json'
    if row['status'] != 'done' or not exported.exists():
      exported = workdirs.path_of(workdir) / LATENCY_DIR / entry['name'] / 'latency.json'
    if exported.exists():
      row.update({k: v for k, v in json.loads(exported.read_text()).items() if k in COLUMNS})
    rows.append(row)
  rows += paper_only_rows(workdir, plan)
  table = io.StringIO(newline='')
  writer = csv.DictWriter(table, COLUMNS)
  writer.writeheader()
  writer.writerows(rows)
  workdirs.write_atomic(workdirs.path_of(workdir) / 'results.csv', table.getvalue())
  workdirs.write_atomic(workdirs.path_of(workdir) / 'results.md', markdown_table(rows))
  plot(rows, workdirs.path_of(workdir) / 'accuracy_vs_madds')
  if any(r['latency_ms'] is not None and r['top1'] is not None for r in rows):
    plot_latency(rows, workdirs.path_of(workdir) / 'accuracy_vs_latency')
  if any(r['latency_ms'] is not None for r in rows):
    plot_latency_against_madds(rows, workdirs.path_of(workdir) / 'latency_vs_madds')
  return rows


def untrained_latencies(points: list[Point], workdir: str, runs: int) -> None:
  """Exports every point with untrained weights (float and int8 LiteRT files, export.py) into
  DIR/latency/<run>/ of the local `workdir` and times both on one thread; points timed before are
  skipped."""
  import export  # pylint: disable=g-import-not-at-top
  for i, point in enumerate(points, 1):
    directory = os.path.join(workdir, LATENCY_DIR, point.name)
    if os.path.exists(os.path.join(directory, 'latency.json')):
      print(f'[{i}/{len(points)}] {point.name}: skipped (timed)', flush=True)
      continue
    result = export.untrained_latency(point.config(), directory, runs)
    print(f'[{i}/{len(points)}] {point.name}: {result["latency_ms"]:.3f} ms float, '
          f'{result["int8_latency_ms"]:.3f} ms int8', flush=True)


def export_points(workdir: str) -> list[str]:
  """Exports every finished point of the sweep in `workdir` that has no export yet (float and
  int8 LiteRT files, latency, int8 top-1: export.export_and_measure); returns their names."""
  import export  # pylint: disable=g-import-not-at-top
  exported = []
  for entry in read_plan(workdir):
    run_dir = os.path.join(workdir, entry['name'])
    directory = os.path.join(run_dir, EXPORT_DIR)
    if status(run_dir) != 'done' or os.path.exists(os.path.join(directory, 'export.json')):
      continue
    if not workdirs.is_local(run_dir):
      raise ValueError(f'--export writes LiteRT files next to each run: {workdir} must be a '
                       'local directory (copy the sweep here first).')
    print(f'exporting {entry["name"]} ...', flush=True)
    result = export.export_and_measure(run_dir, directory)
    print(f'  {result["latency_ms"]:.3f} ms float, {result["int8_latency_ms"]:.3f} ms int8, '
          f'int8 top-1 {100 * result["int8_top1"]:.2f}%', flush=True)
    exported.append(entry['name'])
  return exported


def markdown_table(rows: list[dict]) -> str:
  """The collected table; with the papers' label, MAdds and top-1 where a row matches."""
  header = ('run', 'model', 'alpha', 'groups', 'image size', 'variant', 'MAdds (M)',
            'params (M)', 'top-1 %', 'top-5 %', 'EMA top-1 %', 'train img/s', 'wall time',
            'status', 'paper', 'paper MAdds (M)', 'paper params (M)', 'paper top-1 %')
  exported = any(r['latency_ms'] is not None for r in rows)
  if exported:
    header += ('latency ms', 'int8 latency ms', 'int8 top-1 %', 'file kB', 'int8 file kB')
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    wall = '' if r['wall_time_sec'] is None else f'{r["wall_time_sec"] / 60:.1f} min'
    cells = (r['run'], r['model'], f'{r["alpha"]:g}', '' if r['groups'] is None else r['groups'],
             r['image_size'], r['variant'] or '', _cell(r['macs'], 1e-6),
             _cell(r['params'], 1e-6, 2), _cell(r['top1'], 100, 2), _cell(r['top5'], 100, 2),
             _cell(r['ema_top1'], 100, 2), _cell(r['train_images_per_sec'], 1, 0), wall,
             r['status'], r['paper_label'] or '', _cell(r['paper_madds_millions'], 1, 0),
             _cell(r['paper_params_millions'], 1, 2), _cell(r['paper_top1'], 1, 1))
    if exported:
      cells += (_cell(r['latency_ms'], 1, 3), _cell(r['int8_latency_ms'], 1, 3),
                _cell(r['int8_top1'], 100, 2), _cell(r['tflite_bytes'], 1e-3, 0),
                _cell(r['int8_tflite_bytes'], 1e-3, 0))
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(lines) + '\n' + seed_summary(rows)


def _cell(value, scale=1.0, digits=1) -> str:
  """A table cell: `value * scale` with `digits` decimals, '' for None."""
  return '' if value is None else f'{value * scale:.{digits}f}'


def complexity_table(rows: list[dict]) -> str:
  """Our MAdds and parameters beside the papers' (and their top-1) for every row, and the papers'
  rows of other networks; with the latency of the exported files where they were timed: what
  --complexity_only and --latency_only print."""
  header = ('run', 'model', 'alpha', 'groups', 'image size', 'variant', 'MAdds (M)',
            'params (M)', 'paper', 'paper MAdds (M)', 'paper params (M)', 'paper top-1 %')
  timed = any(r['latency_ms'] is not None for r in rows)
  if timed:
    header += ('latency ms', 'int8 latency ms', 'file kB', 'int8 file kB')
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    cells = (r['run'], r['model'], f'{r["alpha"]:g}', '' if r['groups'] is None else r['groups'],
             r['image_size'], r['variant'] or '', _cell(r['macs'], 1e-6),
             _cell(r['params'], 1e-6, 2), r['paper_label'] or '',
             _cell(r['paper_madds_millions'], 1, 0), _cell(r['paper_params_millions'], 1, 2),
             _cell(r['paper_top1'], 1, 1))
    if timed:
      cells += (_cell(r['latency_ms'], 1, 3), _cell(r['int8_latency_ms'], 1, 3),
                _cell(r['tflite_bytes'], 1e-3, 0), _cell(r['int8_tflite_bytes'], 1e-3, 0))
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(lines) + '\n'


def seed_summary(rows: list[dict]) -> str:
  """A table of top-1 over the seeds of each setting (finished runs whose names differ only in
  their '-seed<k>' part): mean, sample standard deviation and range; '' where no run has one."""
  seeds = collections.defaultdict(list)
  for r in rows:
    if r['top1'] is not None and SEED_PART.search(r['run']):
      seeds[SEED_PART.sub('', r['run'])].append(100 * r['top1'])
  if not seeds:
    return ''
  lines = ['', '| setting | seeds | mean top-1 % | std | min | max |', '|---|---|---|---|---|---|']
  for setting, top1 in seeds.items():
    std = statistics.stdev(top1) if len(top1) > 1 else float('nan')
    lines.append(f'| {setting} | {len(top1)} | {statistics.mean(top1):.2f} | {std:.2f} | '
                 f'{min(top1):.2f} | {max(top1):.2f} |')
  return '\n'.join(lines) + '\n'


def read_published() -> list[dict]:
  """The papers' rows (configs/sweeps/published.csv)."""
  with open(PUBLISHED) as f:
    return list(csv.DictReader(line for line in f if not line.startswith('#')))


def _number(text: str) -> Optional[float]:
  return float(text) if text else None


def _published_key(point: dict) -> tuple:
  """IDENTITY's values of a plan entry or of a row of published.csv, as comparable text."""
  def text(field):
    value = point[field]
    if field in ('alpha', 'groups', 'image_size'):
      return '' if value in (None, '') else f'{float(value):g}'
    return str(value)
  return tuple(text(field) for field in IDENTITY)


def family(row: dict) -> str:
  """Points of one family differ only in width: same model, groups, resolution and variant."""
  groups = f' g={row["groups"]}' if row['model'] == 'shufflenet' else ''
  variant_part = f', {row["variant"]}' if row.get('variant') else ''
  return f'{row["model"]}{groups}, {row["image_size"]} px{variant_part}'


def plot(rows: list[dict], path_stem: str) -> None:
  """Top-1 against MAdds (log axis), one line per family, points labelled width/resolution;
  the papers' rows that match points of the sweep as crosses of the family's colour."""
  fig, ax = _new_figure()
  for name in sorted({family(r) for r in rows}):
    members = sorted((r for r in rows if family(r) == name), key=lambda r: r['macs'] or 0)
    finished = [r for r in members if r['top1'] is not None]
    color = None
    if finished:
      x = [r['macs'] / 1e6 for r in finished]
      y = [100 * r['top1'] for r in finished]
      color = ax.plot(x, y, marker='o', label=name)[0].get_color()
      for r, xi, yi in zip(finished, x, y):
        ax.annotate(f'{r["alpha"]:g}/{r["image_size"]}', (xi, yi), textcoords='offset points',
                    xytext=(4, 4), fontsize=7)
    paper = [r for r in members
             if r['paper_top1'] is not None and r['paper_madds_millions'] is not None]
    if paper:
      ax.scatter([r['paper_madds_millions'] for r in paper], [r['paper_top1'] for r in paper],
                 marker='x', color=color, label=f'{name}, published')
  _save_figure(fig, ax, 'Million Mult-Adds (log scale)', path_stem)


def plot_latency(rows: list[dict], path_stem: str) -> None:
  """Top-1 against the exported files' single-image latency (log axis), one line per family for
  the float files (top-1 of the JAX model, which they compute) and a dashed one for int8."""
  fig, ax = _new_figure()
  exported = [r for r in rows if r['latency_ms'] is not None and r['top1'] is not None]
  for name in sorted({family(r) for r in exported}):
    members = sorted((r for r in exported if family(r) == name), key=lambda r: r['latency_ms'])
    line, = ax.plot([r['latency_ms'] for r in members], [100 * r['top1'] for r in members],
                    marker='o', label=f'{name}, float')
    members = sorted(members, key=lambda r: r['int8_latency_ms'])
    ax.plot([r['int8_latency_ms'] for r in members], [100 * r['int8_top1'] for r in members],
            marker='x', linestyle='--', color=line.get_color(), label=f'{name}, int8')
    for r in members:
      ax.annotate(f'{r["alpha"]:g}/{r["image_size"]}', (r['latency_ms'], 100 * r['top1']),
                  textcoords='offset points', xytext=(4, 4), fontsize=7)
  cpu = exported[0]['latency_cpu'] if exported else None
  _save_figure(fig, ax, 'Latency of one image, ms, one thread (log scale)'
               + (f'; {cpu}' if cpu else ''), path_stem)


def network(row: dict) -> str:
  """The network of a row, whatever its width and resolution: model, ShuffleNet's groups and the
  variant."""
  groups = f' g={row["groups"]}' if row['model'] == 'shufflenet' else ''
  return f'{row["model"]}{groups}' + (f', {row["variant"]}' if row.get('variant') else '')


def plot_latency_against_madds(rows: list[dict], path_stem: str) -> None:
  """Single-image latency of the exported files against MAdds, log axes: one colour per network
  (every width and resolution), float files as dots and int8 files as crosses; where MAdds do and
  do not predict speed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  fig, ax = _new_figure()
  fig.set_size_inches(11, 6.5)
  timed = [r for r in rows if r['latency_ms'] is not None and r['macs'] is not None]
  names = sorted({network(r) for r in timed})
  colors = matplotlib.colormaps['tab20'].resampled(max(len(names), 1))
  for i, name in enumerate(names):
    members = [r for r in timed if network(r) == name]
    x = [r['macs'] / 1e6 for r in members]
    ax.scatter(x, [r['latency_ms'] for r in members], marker='o', color=colors(i), label=name)
    ax.scatter(x, [r['int8_latency_ms'] for r in members], marker='x', color=colors(i))
  ax.set_yscale('log')
  cpu = timed[0]['latency_cpu'] if timed else None
  ax.set_title('dots: float files, crosses: int8 files' + (f'; one thread of an {cpu}' if cpu
                                                            else ''), fontsize=9)
  _save_figure(fig, ax, 'Million Mult-Adds (log scale)', path_stem,
               ylabel='Latency of one image, ms (log scale)', legend_outside=True)


def _new_figure():
  """A figure and axes of the sweep plots, drawn without a display."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt.subplots(figsize=(8, 5.5))


def _save_figure(fig, ax, xlabel: str, path_stem: str, ylabel: str = 'Top-1 accuracy (%)',
                 legend_outside: bool = False) -> None:
  """Log x axis with plain tick labels, grid, legend (inside, or right of the axes); writes
  path_stem.png and .svg."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.set_xscale('log')
  # Plain numbers at 1, 2 and 5 of every decade (0.2, 0.5, 1, 2, 5, 10, ...).
  ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
  for axis_ticks in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
    axis_ticks(ticker.FuncFormatter(lambda value, _: f'{value:g}'))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, which='both', alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    if legend_outside:
      ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    else:
      ax.legend(fontsize=8)
  fig.tight_layout()
  for suffix in ('png', 'svg'):
    image = io.BytesIO()
    fig.savefig(image, format=suffix, dpi=150)
    epath.Path(f'{path_stem}.{suffix}').write_bytes(image.getvalue())
  plt.close(fig)


def slurm_resources(f) -> slurm_launch.Resources:
  """What each point asks of Slurm, from the --slurm_* flags."""
  return slurm_launch.Resources(
      partition=f.slurm_partition, account=f.slurm_account, qos=f.slurm_qos,
      time_minutes=f.slurm_time, nodes=f.slurm_nodes, tasks_per_node=f.slurm_tasks_per_node,
      gpus_per_node=f.slurm_gpus_per_node, cpus_per_task=f.slurm_cpus_per_task, mem=f.slurm_mem,
      signal_delay_s=f.slurm_signal_delay, sbatch_options=tuple(f.slurm_option),
      setup=tuple(f.slurm_setup))


def job_name(workdir: str) -> str:
  """The Slurm job name of a sweep: its directory's name."""
  return f'sweep-{folder_name(workdir)}'


def launch_on_slurm(points: list[Point], workdir: str, command, resources: slurm_launch.Resources,
                    max_parallel: int, wait: bool) -> None:
  """Submits every point that is neither done nor in Slurm's queue as one job array (at most
  `max_parallel` running at once; 0: no limit); with `wait`, follows the array until it has left
  the queue, then collects and exits with 1 if a point did not finish."""
  in_queue = slurm_launch.point_queue_states(workdir)
  records = slurm_launch.read_records(workdir)
  tasks = {}
  for point in points:
    run_dir = os.path.join(workdir, point.name)
    if status(run_dir) == 'done':
      print(f'{point.name}: skipped (done)')
    elif point.name in in_queue:
      print(f'{point.name}: {in_queue[point.name]} as job {records[point.name]}, not submitted '
            'again')
    else:
      tasks[point.name] = slurm_launch.PointTask(run_dir, tuple(command(point)))
  if tasks:
    submitted = slurm_launch.submit(tasks, workdir, resources, max_parallel or len(tasks),
                                    job_name(workdir))
    for name, job in submitted.items():
      print(f'{name}: submitted as job {job}', flush=True)
  if not wait:
    print(f'Follow the points with: python sweep.py --collect={workdir}')
    return
  slurm_launch.wait(workdir, [p.name for p in points], lambda line: print(line, flush=True))
  rows = collect(workdir)
  print(markdown_table(rows), end='')
  unfinished = [r['run'] for r in rows if r['status'] != 'done']
  if unfinished:
    print(f'{len(unfinished)} point(s) did not finish: {", ".join(unfinished)}; rerun the same '
          'command to submit them again (finished points are skipped).')
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.collect:
    try:
      if f.export:
        export_points(f.collect)
      rows = collect(f.collect)
    except ValueError as e:
      raise SystemExit(f'error: {e}') from None
    print(markdown_table(rows), end='')
    return
  if f.config is None or not f.workdir:
    raise app.UsageError('Give --config=configs/sweeps/<name>.py and --workdir=DIR '
                         '(or --collect=DIR).')
  if f.launch == 'tpu' and not (f.tpu_name and f.zone):
    raise app.UsageError('--launch=tpu needs --tpu_name and --zone.')
  resources = slurm_resources(f)
  unreadable = None  # why --dry_run cannot read the sweep directory, which it only reports
  try:
    points = expand(f.config)
    published = tuple(f.config.get('published', ()))
    check_published_sources(published)
    if f.latency_only and not workdirs.is_local(f.workdir):
      raise ValueError(f'--latency_only writes LiteRT files: {f.workdir} must be a local '
                       'directory.')
    check_points(points)
    try:
      workdirs.check_readable(f.workdir)
    except ValueError as e:
      if not f.dry_run:
        raise
      unreadable = e
    else:
      check_workdir(points, f.workdir)
    if f.launch == 'slurm' and not f.dry_run:
      slurm_launch.check_cluster(resources, f.workdir)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  workdir = (os.path.abspath(f.workdir) if f.launch != 'tpu' and workdirs.is_local(f.workdir)
             else f.workdir)

  def command(point):
    if f.launch == 'local':
      return point.command(workdir, sys.executable)
    if f.launch == 'slurm':
      return point.command(workdir, sys.executable, distributed=resources.tasks > 1)
    remote = ' '.join(shlex.quote(a) for a in point.command(workdir, 'python3', distributed=True))
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', f.tpu_name, f'--zone={f.zone}',
            '--worker=all', f'--command=cd {shlex.quote(f.tpu_repo_dir)} && {remote}']

  if f.dry_run or f.complexity_only or f.latency_only:
    complexities = {p.name: {k: v for k, v in complexity.summary(p.config()).items()
                             if k in ('macs', 'params')} for p in points}
    if unreadable is None:
      save_plan(points, workdir, complexities, published)
    for point in points if f.dry_run else ():
      c = complexities[point.name]
      print(f'{point.name}: {c["macs"] / 1e6:.1f} M MAdds, {c["params"] / 1e6:.2f} M params')
      print('  ' + ' '.join(shlex.quote(a) for a in command(point)))
    if f.dry_run and f.launch == 'slurm':
      print('The sbatch file of the job array (submitit); each task runs its point\'s command:')
      print(slurm_launch.sbatch_script(resources, f.max_parallel or len(points),
                                       job_name(workdir), workdir, len(points)))
    if unreadable is not None:
      print(f'warning: {unreadable} The plan above is neither saved there nor checked against '
            'the runs it may hold.')
    if f.latency_only:
      untrained_latencies(points, workdir, f.latency_runs)
    if f.complexity_only or f.latency_only:
      print(complexity_table(collect(workdir)), end='')
      print(f'Wrote {workdir}/results.csv and results.md.')
    return

  save_plan(points, workdir, published=published)
  if f.launch == 'slurm':
    try:
      launch_on_slurm(points, workdir, command, resources, f.max_parallel, f.wait)
    except ValueError as e:
      raise SystemExit(f'error: {e}') from None
    return
  outcomes = {}
  for i, point in enumerate(points, 1):
    print(f'[{i}/{len(points)}] {point.name} ...', flush=True)
    outcomes[point.name] = run_point(point, workdir, command(point))
    print(f'[{i}/{len(points)}] {point.name}: {outcomes[point.name]}', flush=True)
  if f.export:
    try:
      export_points(workdir)
    except ValueError as e:
      raise SystemExit(f'error: {e}') from None
  rows = collect(workdir)
  print(markdown_table(rows), end='')
  failed = [name for name, outcome in outcomes.items() if outcome.startswith('failed')]
  if failed:
    print(f'{len(failed)} point(s) failed: {", ".join(failed)}; rerun the same command to retry '
          'them (finished points are skipped).')
    sys.exit(1)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Sweep file in configs/sweeps/.')
  flags.DEFINE_string('workdir', None, 'Sweep directory: one main.py workdir per point.')
  flags.DEFINE_bool('dry_run', False, 'List the points, MAdds, params and commands; run nothing.')
  flags.DEFINE_bool('complexity_only', False,
                    'Fill results.csv/results.md with MAdds and params only; train nothing.')
  flags.DEFINE_bool('latency_only', False,
                    'Export every point with untrained weights to LiteRT float and int8 files, '
                    'time both on one thread (latency does not depend on the weights), and fill '
                    'results.csv/results.md and latency_vs_madds.png; train nothing.')
  flags.DEFINE_integer('latency_runs', 50, '--latency_only: timed single-image runs of each '
                       'file.', lower_bound=1)
  flags.DEFINE_string('collect', None, 'Only collect DIR into results.csv/.md and the plot.')
  flags.DEFINE_bool('export', False, 'Export every finished point to LiteRT (float and int8), '
                    'time both and evaluate the int8 file (export.py); with --collect, for a '
                    'sweep that has run.')
  flags.DEFINE_enum('launch', 'local', ['local', 'tpu', 'slurm'],
                    'local: run each point here, one after another; tpu: on every worker of a '
                    'Cloud TPU VM slice; slurm: every point a task of one Slurm job array.')
  flags.DEFINE_string('tpu_name', None, '--launch=tpu: the TPU VM name.')
  flags.DEFINE_string('zone', None, '--launch=tpu: the TPU VM zone.')
  flags.DEFINE_string('tpu_repo_dir', 'mobilenets',
                      '--launch=tpu: this repository on the TPU VM workers, relative to the '
                      'home directory or absolute (set up there with setup.sh).')
  flags.DEFINE_integer('max_parallel', 0, '--launch=slurm: at most this many points running at '
                       'once (0: no limit).', lower_bound=0)
  flags.DEFINE_bool('wait', False, '--launch=slurm: follow the job array until it has left the '
                    'queue, then collect (otherwise: submit and return).')
  flags.DEFINE_string('slurm_partition', None, '--launch=slurm: the partition (sbatch '
                      '--partition; default: the cluster\'s default).')
  flags.DEFINE_string('slurm_account', None, '--launch=slurm: sbatch --account.')
  flags.DEFINE_string('slurm_qos', None, '--launch=slurm: sbatch --qos.')
  flags.DEFINE_integer('slurm_time', 24 * 60, '--launch=slurm: time limit of a point, minutes; '
                       'a point that reaches it is checkpointed, requeued and resumed.',
                       lower_bound=1)
  flags.DEFINE_integer('slurm_nodes', 1, '--launch=slurm: nodes per point.', lower_bound=1)
  flags.DEFINE_integer('slurm_tasks_per_node', 1, '--launch=slurm: main.py processes per node '
                       '(one per node sees all its GPUs).', lower_bound=1)
  flags.DEFINE_integer('slurm_gpus_per_node', 0, '--launch=slurm: GPUs per node.', lower_bound=0)
  flags.DEFINE_integer('slurm_cpus_per_task', None, '--launch=slurm: CPUs per task.',
                       lower_bound=1)
  flags.DEFINE_string('slurm_mem', None, '--launch=slurm: memory per node (sbatch --mem, '
                      'e.g. 200G).')
  flags.DEFINE_integer('slurm_signal_delay', 120, '--launch=slurm: seconds before the time limit '
                       'at which a point gets SIGTERM to checkpoint.', lower_bound=1)
  flags.DEFINE_multi_string('slurm_option', [], '--launch=slurm: any other sbatch option, as '
                            'name=value (repeatable): --slurm_option=constraint=a100.')
  flags.DEFINE_multi_string('slurm_setup', [], '--launch=slurm: a shell line run before the '
                            'point starts (repeatable): --slurm_setup="module load cuda".')
  app.run(main, flags_parser=cli.parse_flags)
