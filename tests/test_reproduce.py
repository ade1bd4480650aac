"""reproduce.py, the pipeline behind the paper's table, through its command line on the demo data (40 images,
64 px, nano Swin, small BERT, CPU, 1 epoch per step, 2 shares): the table has every method and share and
agrees with test.py's files; each cell has its interval and each share its paired differences, with the
breakdown and the scores plot beside them; a second run reuses every step; an interrupted training step continues from
its model_last; a changed configuration is refused; --fresh redoes finished steps; a failing step stops the
pipeline with one line; bad input is one line before anything runs. Then the same through --launcher slurm on
a real single-node SLURM (tests/slurm_cluster.py): the same table, a re-run submits nothing, a time limit and a
scancel end up resumed, a failing step cancels what needs it. Several seeds give mean ± sd cells."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib.pipeline import config, runner
from lib.pipeline.main import main as reproduce_main
from lib.pipeline.plan import Plan

REPO = Path(__file__).resolve().parents[1]
SHARES = ('10', '50')
METHOD_LABELS = ('Only Accurate', 'Naive-WREL', 'LRB-WREL')
STEPS_PER_SHARE = 11  # splits, 4 trainings, 3 methods x 2 splits of test.py


def pipeline_args(demo_root, small_bert_dir, out, *extra):
    return ['--refer_data_root', demo_root, '--dataset', 'rrsisd', '--ratios', *SHARES, '--device', 'cpu',
            '--jobs', '2', '--swin_type', 'nano', '--img_size', '64', '--pretrained_swin_weights', '',
            '--ck_bert', small_bert_dir, '--epochs', '1', '--teacher_epoch', 'last', '--batch_size', '4',
            '--workers', '0', '--lr', '1e-3', '--stage2_lr', '1e-2', '--stage3_lr', '1e-3', '--caption_lr', '1e-2',
            '--figure_samples', '2', '--output_dir', out, *extra]


def run(args, check=True, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **(env_extra or {}))
    proc = subprocess.run([sys.executable, str(REPO / 'reproduce.py')] + [str(a) for a in args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f'reproduce.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}')
    return proc


def step_lines(stdout, word):
    """Names of the steps whose status line says `word` (reused / running / continuing)."""
    return re.findall(rf'\] (\S+): {word}', stdout)


def read(path):
    with open(path) as f:
        return json.load(f)


REWRITTEN = ('table.md', 'table.json', 'figure.png', 'pipeline.json', 'breakdown.md', 'scores.png', 'intervals.json')


def snapshot(out):
    """Every file's modification time (ns) and size under the pipeline folder, but the table and figures."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob('*')
            if p.is_file() and p.name not in REWRITTEN}


@pytest.fixture(scope='module')
def pipeline(demo_root, small_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('reproduce') / 'out'
    args = pipeline_args(demo_root, small_bert_dir, out)
    proc = run(args)
    return {'out': out, 'args': args, 'proc': proc, 'files': snapshot(out)}


def test_table_has_every_method_and_share(pipeline):
    out, proc = pipeline['out'], pipeline['proc']
    table = read(out / 'table.json')
    rows = [(r['ratio'], r['method']) for r in table['rows']]
    assert rows == [(float(s), m) for s in SHARES for m in METHOD_LABELS]
    for row in table['rows']:
        share, method = row['ratio'], row['method']
        key = {'Only Accurate': 'only-accurate', 'Naive-WREL': 'naive-wrel', 'LRB-WREL': 'lrb-wrel'}[method]
        for split in ('val', 'test'):
            result = read(out / 'results' / f'acc{int(share)}-{key}-{split}.json')  # test.py's own file
            assert row[f'oIoU_{split}'] == round(result['oIoU'], 2)
            assert row[f'mIoU_{split}'] == round(result['mIoU'], 2)
            assert result['split'] == split and result['checkpoint'] == row['checkpoint']
            assert row[f'num_sentences_{split}'] == {'val': 4, 'test': 8}[split]  # every sentence of the split
        expected = {'only-accurate': 'acc{}-only-accurate/model_best_RMSIN.pth',
                    'naive-wrel': 'acc{}-naive-wrel/model_best_RMSIN.pth',
                    'lrb-wrel': 'acc{}-lrb-stage3/model_best_oIoU_RMSIN.pth'}[key].format(int(share))
        assert row['checkpoint'].endswith(expected)
    assert table['config']['epochs'] == {k: 1 for k in ('stage1', 'naive', 'stage2', 'stage3', 'full')}
    assert 'model_last' in table['config']['teacher']
    assert re.fullmatch(r'[0-9a-f]{40}', table['git']['commit'] or '')
    assert 0 < table['trivial']['test']['oIoU'] < 10  # objects cover a few % of a demo image

    md = (out / 'table.md').read_text()
    paper = md.split('\n\n')[1]  # the table in the paper's form; the differences come after it
    assert paper.startswith('| Ratio | Method | oIoU Val | oIoU Test | mIoU Val | mIoU Test |\n')
    assert paper.count('| 10%') == 1 and paper.count('| 50%') == 1 and paper.count('LRB-WREL |') == 2
    assert md.split('| Ratio')[1] in proc.stdout  # the table is printed at the end
    assert (out / 'figure.png').is_file() and str(out / 'figure.png') in proc.stdout


def test_table_has_intervals_and_differences(pipeline):
    """Each cell has a 95 % interval around its value (from test.py's records); per share, the differences
    Naive-WREL - Only Accurate and LRB-WREL - Naive-WREL are those of the cells, with interval and p-value;
    breakdown.md and scores.png are written."""
    out = pipeline['out']
    table = read(out / 'table.json')
    cells, printed = {}, {}
    for row in table['rows']:
        assert set(row['intervals']) == {'oIoU_val', 'oIoU_test', 'mIoU_val', 'mIoU_test'}
        for column, iv in row['intervals'].items():
            assert round(iv['value'], 2) == row[column] and iv['seeds'] == [pytest.approx(iv['value'])]  # one seed
            assert iv['low'] <= iv['value'] <= iv['high']
            cells[(row['ratio'], row['method'], column)] = iv['value']
            printed[(row['ratio'], row['method'], column)] = row[column]
    assert table['significance']['confidence'] == 0.95 and table['significance']['training_seeds'] == 1
    pairs = [(d['ratio'], d['later'], d['earlier']) for d in table['differences']]
    assert pairs == [(float(s), later, earlier) for s in SHARES
                     for later, earlier in (('Naive-WREL', 'Only Accurate'), ('LRB-WREL', 'Naive-WREL'))]
    for d in table['differences']:
        for column in ('oIoU_val', 'oIoU_test', 'mIoU_val', 'mIoU_test'):
            diff = d[column]
            expected = cells[(d['ratio'], d['later'], column)] - cells[(d['ratio'], d['earlier'], column)]
            assert diff['diff'] == pytest.approx(expected, abs=1e-9)
            cell_difference = printed[(d['ratio'], d['later'], column)] - printed[(d['ratio'], d['earlier'], column)]
            assert abs(diff['diff'] - cell_difference) <= 0.01 + 1e-9  # the printed cells are rounded
            assert diff['low'] <= diff['high'] and 0 <= diff['p_value'] <= 1
            assert diff['excludes_zero'] == (diff['low'] > 0 or diff['high'] < 0)
    md = (out / 'table.md').read_text()
    assert re.search(r'\| 10%   \| Only Accurate \| (\*\*)?\d+\.\d\d(\*\*)? \[\d+\.\d\d, \d+\.\d\d\] \|', md), md
    assert md.count('Naive-WREL − Only Accurate |') == 2 and md.count('LRB-WREL − Naive-WREL |') == 2
    assert re.search(r'\| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] p[=<]0\.\d{3}', md), md
    assert 'bold**: the interval excludes 0' in md
    breakdown = (out / 'breakdown.md').read_text()
    assert all(f'## {s} % accurate' in breakdown for s in SHARES) and all(m in breakdown for m in METHOD_LABELS)
    assert (out / 'scores.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and (out / 'scores.png').stat().st_size > 5000
    assert (out / 'results' / 'acc10-lrb-wrel-test_records.npz').stat().st_size > 0


def test_steps_are_the_real_scripts_with_their_inputs(pipeline):
    out = pipeline['out']
    names = [p.name for p in (out / 'stages').iterdir()]
    assert len(names) == 2 * STEPS_PER_SHARE
    for name in names:  # every step has its manifest (its exact command line) and its own log
        manifest = read(out / 'stages' / name / 'stage.json')
        assert manifest['step'] == name and manifest['command'][0] == sys.executable
        assert (out / 'logs' / f'{name}.log').read_text().count('\n===== ') == 1
    s2 = read(out / 'stages' / 'acc10-lrb-stage2' / 'stage.json')['command']
    s3 = read(out / 'stages' / 'acc10-lrb-stage3' / 'stage.json')['command']
    splits = read(out / 'stages' / 'acc10-splits' / 'stage.json')['command']
    assert Path(s2[1]).name == 'train_stu_base.py' and Path(s3[1]).name == 'train_stu_tea.py'
    assert splits[splits.index('--ratios') + 1] == '90'  # 10 % accurate = 90 % weak
    teacher = str(out / 'stages' / 'acc10-only-accurate' / 'model_last_RMSIN.pth')
    assert s2[s2.index('--resume') + 1] == teacher == s3[s3.index('--resume') + 1]
    assert s2[s2.index('--refer_data_root') + 1].endswith('rrsisd-90-mask')
    assert s3[s3.index('--refer_data_root') + 1].endswith('rrsisd-90-all')
    assert s3[s3.index('--caption_embedding_path') + 1] == str(out / 'stages' / 'acc10-lrb-stage2' /
                                                               'caption_embeddings_RMSIN.pt')
    stdout = pipeline['proc'].stdout
    assert 'acc10-naive-wrel: epoch 1/1 done, val oIoU' in stdout and 'step eta' in stdout
    assert 'acc10-lrb-stage2: epoch 1/1 done, weak train oIoU' in stdout


def test_second_run_reuses_every_step(pipeline):
    proc = run(pipeline['args'])
    assert sorted(step_lines(proc.stdout, 'reused')) == sorted(p.name for p in (pipeline['out'] / 'stages').iterdir())
    assert not step_lines(proc.stdout, 'running') and not step_lines(proc.stdout, 'continuing')
    assert snapshot(pipeline['out']) == pipeline['files']  # no checkpoint, result or log touched


def test_changed_configuration_is_refused(pipeline):
    proc = run(pipeline['args'] + ['--naive_epochs', '2'], check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.match(r'reproduce.py: error: step acc10-naive-wrel in \S+ finished with another configuration '
                    r'\(--epochs 1 -> 2\); pass --fresh', line), line
    assert snapshot(pipeline['out']) == pipeline['files']


def test_interrupted_step_continues_from_its_last_checkpoint(pipeline):
    """As if stage 3 had been killed after its last checkpoint: its manifest says started, not finished. The
    rerun continues it with --resume model_last (not from the teacher); what depends on it is redone, the
    rest reused."""
    out = pipeline['out']
    stage = out / 'stages' / 'acc50-lrb-stage3'
    done = read(stage / 'stage.json')
    (stage / 'stage.json').unlink()
    (stage / 'started.json').write_text(json.dumps({'step': stage.name, 'config': done['config']}))
    proc = run(pipeline['args'])
    assert step_lines(proc.stdout, 'continuing') == ['acc50-lrb-stage3']
    assert sorted(step_lines(proc.stdout, 'running')) == ['acc50-lrb-wrel-test', 'acc50-lrb-wrel-val']
    assert len(step_lines(proc.stdout, 'reused')) == 2 * STEPS_PER_SHARE - 3
    log = (out / 'logs' / 'acc50-lrb-stage3.log').read_text().split('\n===== ')[-1]
    assert f'--resume {stage / "model_last_RMSIN.pth"}' in log.splitlines()[0]
    assert 'nothing to do: the checkpoint already finished epoch 0 of 1' in log
    assert read(stage / 'stage.json')['result_id'] != done['result_id'] and not (stage / 'started.json').exists()


@pytest.fixture(scope='module')
def failing(demo_root, small_bert_dir, tmp_path_factory):
    """A pipeline whose training steps fail (train.py refuses the flag): its splits steps finish first."""
    out = tmp_path_factory.mktemp('failing') / 'out'
    args = pipeline_args(demo_root, small_bert_dir, out, '--extra_args', '--cross_scale bogus')
    return out, args, run(args, check=False)


def test_failing_step_stops_the_pipeline_with_one_line(failing):
    out, _, proc = failing
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"reproduce.py: error: step acc(10|50)-(only-accurate|naive-wrel) failed \(exit 2\): "
                    r"train.py: error: argument --cross_scale: invalid choice: 'bogus'.*; log: \S+\.log$", line), line
    assert Path(line.rsplit('log: ', 1)[1]).is_file()
    finished = sorted(p.parent.name for p in (out / 'stages').glob('*/stage.json'))
    assert 'acc10-splits' in finished  # what finished is kept
    assert all(name.endswith('-splits') for name in finished)  # no training finished, no test ran
    assert not (out / 'results').exists() and not (out / 'table.md').exists()


def test_fresh_redoes_finished_steps(failing):
    """Without --fresh the finished splits step is reused; with it, every step runs again."""
    out, args, _ = failing
    before = read(out / 'stages' / 'acc10-splits' / 'stage.json')['result_id']
    again = run(args, check=False)
    assert again.returncode == 2 and 'acc10-splits' in step_lines(again.stdout, 'reused')
    assert read(out / 'stages' / 'acc10-splits' / 'stage.json')['result_id'] == before
    fresh = run(args + ['--fresh'], check=False)
    assert fresh.returncode == 2 and not step_lines(fresh.stdout, 'reused')
    assert 'acc10-splits' in step_lines(fresh.stdout, 'running')
    assert read(out / 'stages' / 'acc10-splits' / 'stage.json')['result_id'] != before
    assert (out / 'logs' / 'acc10-splits.log').read_text().count('\n===== ') == 1  # the old logs went too


def test_seeds_give_mean_and_sd_cells(pipeline, tmp_path):
    """--seeds 2401 7 at 10 %: seed 2401's steps keep the names of the finished pipeline (so they are reused),
    seed 7's end in -seed7. The table of both (seed 7's test results stood in by the 50 % share's, tested on
    the same refs) has mean ± sd cells, each seed's value in the JSON, and intervals over seeds then refs."""
    import shutil
    import statistics
    from lib.pipeline.report import write_table
    out = tmp_path / 'out'
    shutil.copytree(pipeline['out'], out, symlinks=True)
    args = [str(a) for a in pipeline['args'][:-1]] + [str(out), '--seeds', '2401', '7']
    args[args.index('--ratios') + 1:args.index('--ratios') + 3] = ['10']
    plan = Plan(config.validate(config.build_parser().parse_args(args)))
    first = {s.name for s in plan.steps if s.seed != 7}
    assert first <= {p.name for p in (out / 'stages').iterdir()} | {p.stem for p in (out / 'results').glob('*.json')}
    keys = dict(zip(METHOD_LABELS, ('only-accurate', 'naive-wrel', 'lrb-wrel')))
    for key in keys.values():
        for split in ('val', 'test'):
            for suffix in ('.json', '_records.npz'):
                shutil.copy(out / 'results' / f'acc50-{key}-{split}{suffix}',
                            out / 'results' / f'acc10-{key}-{split}-seed7{suffix}')
    trivial = read(out / 'trivial.json')
    table = write_table(plan, {split: trivial[split] for split in ('val', 'test')})
    rows = read(out / 'table.json')['rows']
    assert len(rows) == 3 and all(r['seeds'] == [2401, 7] for r in rows)
    for row in rows:
        values = [read(out / 'results' / f"acc10-{keys[row['method']]}-test{s}.json")['oIoU'] for s in ('', '-seed7')]
        assert row['per_seed']['oIoU_test'] == values
        assert row['oIoU_test'] == round(statistics.fmean(values), 2)
        assert row['sd']['oIoU_test'] == round(statistics.stdev(values), 2)
        assert row['intervals']['oIoU_test']['seeds'] == pytest.approx(values, abs=1e-9)
    assert re.search(r'\| 10%\s+\| Only Accurate \| [\d.*]+ ± [\d.]+ \[', table), table
    assert 'training seeds 2401, 7 (each cell: mean ± sd over them)' in table
    assert '2 training seeds per method' in table


def test_changed_data_is_refused_like_a_changed_flag(demo_root, small_bert_dir, tmp_path):
    """Finished steps on refs or instances that have changed since: refused in one line (not silently redone;
    --fresh redoes them, as test_fresh_redoes_finished_steps shows)."""
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(demo_root, data, symlinks=True)
    args = pipeline_args(data, small_bert_dir, tmp_path / 'out', '--extra_args', '--cross_scale bogus')
    args[args.index('--ratios') + 1:args.index('--ratios') + 3] = ['10']
    assert run(args, check=False).returncode == 2  # the splits finish, the trainings fail
    instances = data / 'rrsisd' / 'instances.json'
    instances.write_text(instances.read_text() + '\n')
    proc = run(args, check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert re.match(rf"reproduce.py: error: step acc10-splits in \S+ finished on other data: \S+refs\(unc\).p or "
                    rf"{re.escape(str(instances))} changed since \(digest \w+ -> \w+\); pass --fresh", line), line
    assert not step_lines(proc.stdout, 'running')


def test_a_second_pipeline_in_a_busy_folder_is_refused(demo_root, small_bert_dir, tmp_path):
    """While a pipeline trains, a second one in its folder is one line naming the PID and host; once the first
    is killed (SIGKILL) and its step has exited, its locks hold nothing."""
    import signal
    import socket
    from lib.pipeline.locks import StepLocks
    out = tmp_path / 'out'
    args = pipeline_args(demo_root, small_bert_dir, out, '--naive_epochs', '50')
    args[args.index('--ratios') + 1:args.index('--ratios') + 3] = ['10']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    first = subprocess.Popen([sys.executable, str(REPO / 'reproduce.py')] + [str(a) for a in args], cwd=REPO,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = out / 'locks' / 'acc10-naive-wrel.lock'
        wait_for(lambda: lock.is_file() and 'child_pid' in lock.read_text(), 120, "Naive-WREL's lock")
        second = run(args, check=False)
        line = second.stderr.strip().splitlines()[-1]
        host = socket.gethostname()
        assert re.match(rf'reproduce.py: error: step acc10-\S+ is in use by PID {first.pid} on host {host}, since '
                        rf'\S+: another reproduce.py works in {re.escape(str(out))}; wait for it or stop it$', line), line
        child = read(lock)['child_pid']
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    wait_for(lambda: not os.path.exists(f'/proc/{child}') or
             open(f'/proc/{child}/stat').read().rsplit(')', 1)[1].split()[0] == 'Z', 60, 'the step to exit')
    StepLocks(out).check(['acc10-naive-wrel', 'acc10-only-accurate'])  # dead holders: no refusal


# --- bad input: one line, before anything is written --------------------------------------------------------

@pytest.mark.parametrize('change,message', [
    ({'--refer_data_root': '/nonexistent/data'}, '--refer_data_root /nonexistent/data: no such directory'),
    ({'--ratios': '0'}, '--ratios 0: an accurate share must be within 1-99 percent'),
    ({'--ratios': '100'}, '--ratios 100: an accurate share must be within 1-99 percent'),
    ({'--ratios': '120'}, '--ratios 120: an accurate share must be within 1-99 percent'),
    ({'--teacher_epoch': '15'}, r'--teacher_epoch 15: the Only-Accurate run has 1 epochs \(0-0\), so it never '
                                r'writes model_epoch_15.pth'),
    ({'--teacher_epoch': '12'}, '--teacher_epoch 12: train.py writes model_epoch_N.pth only at N = 10, 15, 20'),
    ({'--extra_args': '--epochs 3'}, '--extra_args: --epochs is set by reproduce.py itself'),
    ({'--pretrained_swin_weights': '/nonexistent/swin.pth'}, '--pretrained_swin_weights /nonexistent/swin.pth: '
                                                             'file not found'),
    ({'--ck_bert': '/nonexistent/bert'}, '--ck_bert /nonexistent/bert: no such folder'),
    ({'--device': 'cuda', '--nproc_per_node': '4'}, r'--nproc_per_node 4: larger than the 2 GPU\(s\) present'),
    ({'--device': 'auto', '--nproc_per_node': '4'}, r'--nproc_per_node 4: larger than the 2 GPU\(s\) present'),
    ({'--jobs': '2', '--device': 'cuda'}, '--jobs 2: steps can run side by side only on CPU'),
])
def test_bad_input_is_one_line_before_anything_runs(demo_root, small_bert_dir, tmp_path, monkeypatch, change, message):
    from utils import InputError
    monkeypatch.setattr(config, 'visible_gpus', lambda: 2)
    args = pipeline_args(demo_root, small_bert_dir, tmp_path / 'out')
    args = [str(a) for a in args]
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    with pytest.raises(InputError, match=message):
        reproduce_main(args)
    assert not (tmp_path / 'out').exists()


def test_nproc_larger_than_the_gpus_present_as_a_user_sees_it(demo_root, small_bert_dir, tmp_path):
    proc = run(pipeline_args(demo_root, small_bert_dir, tmp_path / 'out', '--nproc_per_node', '2', '--device', 'auto'),
               check=False, env_extra={'CUDA_VISIBLE_DEVICES': ''})
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.strip() == ('reproduce.py: error: --nproc_per_node 2: larger than the 0 GPUs present '
                                   '(pass --device cpu for CPU processes)')
    assert not (tmp_path / 'out').exists()


def test_foreign_output_folder_is_refused(demo_root, small_bert_dir, tmp_path):
    from utils import InputError
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'notes.txt').write_text('mine')
    with pytest.raises(InputError, match='holds files but no pipeline.json'):
        reproduce_main([str(a) for a in pipeline_args(demo_root, small_bert_dir, tmp_path / 'out')])
    assert os.listdir(tmp_path / 'out') == ['notes.txt']


def test_launcher_command_lines(demo_root, small_bert_dir, tmp_path, monkeypatch):
    """1 process: plain python; several: torchrun --standalone (several nodes: --launcher slurm)."""
    monkeypatch.setattr(config, 'visible_gpus', lambda: 4)
    base = [str(a) for a in pipeline_args(demo_root, small_bert_dir, tmp_path / 'out')]
    base[base.index('--jobs') + 1] = '1'

    def commands(*extra):
        cfg = config.validate(config.build_parser().parse_args(base + list(extra)))
        plan = Plan(cfg)
        assert all((REPO / s.script).is_file() for s in plan.steps)  # the scripts the steps run are there
        steps = {s.kind: s for s in plan.steps}
        return {k: runner.launcher(cfg, s) for k, s in steps.items()}

    one = commands()
    assert one['train'] == [sys.executable, str(REPO / 'train_stu_tea.py')]
    four = commands('--device', 'cuda', '--nproc_per_node', '4', '--batch_size', '8')
    assert four['train'][:5] == [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=4', '--standalone']
    assert four['test'][-1] == str(REPO / 'test.py') and '--nproc_per_node=4' in four['test']
    assert four['splits'] == [sys.executable, str(REPO / 'mask_train_only.py')]  # one process: it is not a training
    extra = commands('--device', 'cuda', '--nproc_per_node', '4', '--batch_size', '8', '--torchrun_args',
                     '--max_restarts 0')
    assert extra['train'][3:-1] == ['--nproc_per_node=4', '--standalone', '--max_restarts', '0']


# --- --launcher slurm, against a real single-node SLURM (tests/slurm_cluster.py) -----------------------------

@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    from tests.slurm_cluster import LocalSlurm, install
    reason = install()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp('slurm'))
    cluster.start()
    yield cluster
    cluster.stop()


def slurm_run(cluster, args, check=True, background=False, env_extra=None):
    args = [str(a) for a in args]
    if '--jobs' in args:  # a local flag: SLURM runs the jobs side by side itself
        del args[args.index('--jobs'):args.index('--jobs') + 2]
    args += ['--launcher', 'slurm', '--poll', '0.5']
    if background:
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **cluster.env, **(env_extra or {}))
        return subprocess.Popen([sys.executable, str(REPO / 'reproduce.py')] + args, cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return run(args, check=check, env_extra={**cluster.env, **(env_extra or {})})


def job_lines(stdout):
    """{step: job id} from the submission lines."""
    return dict(re.findall(r'\] (\S+): job (\d+)', stdout))


def table_cells(out):
    return [{k: v for k, v in row.items() if k != 'checkpoint'} for row in read(out / 'table.json')['rows']]


def copy_pipeline(src, dst, drop=()):
    """A copy of a finished pipeline folder without its logs, table and figures, and without the steps of `drop`
    (their stage folders, splits, results): a run on the copy reuses the rest (a step's configuration names
    its files relative to the folder) and redoes those."""
    import shutil
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(
        'logs', *(name for name in REWRITTEN if name != 'pipeline.json'), 'figure.json'))
    for prefix in drop:
        for path in [*(dst / 'stages').glob(f'{prefix}*'), *(dst / 'results').glob(f'{prefix}*'),
                     *(dst / 'splits').glob(prefix)]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return dst


@pytest.fixture(scope='module')
def slurm_pipeline(slurm, pipeline, tmp_path_factory):
    """The module's pipeline again, the 10 % share's 11 steps (every kind of step) SLURM jobs this time; the
    50 % share's steps are the local run's, reused."""
    out = copy_pipeline(pipeline['out'], tmp_path_factory.mktemp('reproduce_slurm') / 'out', drop=['acc10'])
    args = pipeline['args'][:-1] + [out]
    assert pipeline['args'][-2] == '--output_dir'
    proc = slurm_run(slurm, args)
    return {'out': out, 'args': args, 'proc': proc}


def test_slurm_gives_the_local_table(slurm, slurm_pipeline, pipeline):
    """Every step of a share a job, submitted at once with afterok dependencies; the same table as --launcher
    local."""
    out, stdout = slurm_pipeline['out'], slurm_pipeline['proc'].stdout
    jobs = job_lines(stdout)
    assert sorted(jobs) == sorted(p.name for p in (out / 'stages').glob('acc10-*'))
    assert len(jobs) == STEPS_PER_SHARE and len(step_lines(stdout, 'reused')) == STEPS_PER_SHARE
    assert re.search(rf"acc10-lrb-stage3: job {jobs['acc10-lrb-stage3']} after jobs "
                     rf"{jobs['acc10-only-accurate']}, {jobs['acc10-lrb-stage2']}:", stdout)
    assert table_cells(out) == table_cells(pipeline['out'])
    assert read(out / 'table.json')['differences'] == read(pipeline['out'] / 'table.json')['differences']
    record = read(out / 'slurm' / 'jobs.json')['steps']
    assert {k: v['job_id'] for k, v in record.items()} == jobs
    ended = {c['JobId']: c['JobState'] for c in slurm.completions()}
    assert all(ended[j] == 'COMPLETED' for j in jobs.values())  # SLURM's own record of the jobs
    assert 'acc10-only-accurate: epoch 1/1 done, val oIoU' in stdout  # progress read from the job's log


def test_slurm_rerun_submits_nothing(slurm, slurm_pipeline):
    before = len(slurm.completions())
    proc = slurm_run(slurm, slurm_pipeline['args'])
    assert 'every step is finished: nothing submitted' in proc.stdout and not job_lines(proc.stdout)
    assert len(step_lines(proc.stdout, 'reused')) == 2 * STEPS_PER_SHARE
    assert len(slurm.completions()) == before


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f'timed out after {timeout} s waiting for {what}')


# In a step's training script (PYTHONPATH): once model_last_* is in place, the script sleeps, as if its next epoch
# were long, until it is stopped (SLURM's signal before the time limit, scancel). LRB_TEST_STALL: the folder of
# the markers the stalls leave (one per step); LRB_TEST_STALL_ONCE: the steps that stall only once.
STALL_HOOK = """
import os, sys, time
_markers = os.environ.get('LRB_TEST_STALL')
if _markers and os.path.basename(sys.argv[0]) in ('train.py', 'train_stu_base.py', 'train_stu_tea.py'):
    _step = os.path.basename(os.path.normpath(sys.argv[sys.argv.index('--output-dir') + 1]))
    _replace = os.replace

    def replace(src, dst, *args, **kwargs):
        _replace(src, dst, *args, **kwargs)
        marker = os.path.join(_markers, _step)
        once = _step in os.environ.get('LRB_TEST_STALL_ONCE', '').split(',')
        if os.path.basename(os.fspath(dst)).startswith('model_last_') and not (once and os.path.exists(marker)):
            with open(marker, 'a') as f:
                f.write(str(os.getpid()) + chr(10))
            time.sleep(600)

    os.replace = replace
"""


def test_slurm_time_limit_and_scancel_are_resumed(slurm, pipeline, tmp_path):
    """On a copy of the finished pipeline, the 10 % share with 1-minute jobs and Naive-WREL and LRB stage 3 to
    redo, each stalling after its first checkpoint (STALL_HOOK). Naive-WREL is told to stop by SLURM before its
    time limit, requeues itself, continues from its model_last and finishes, and its tests run after it; stage 3
    is cancelled with scancel mid-training: the pipeline says so in one line and cancels its tests, and the next
    run continues it from its model_last. The table completes."""
    out = copy_pipeline(pipeline['out'], tmp_path / 'out', drop=['acc10-naive-wrel', 'acc10-lrb-stage3'])
    args = pipeline['args'][:-1] + [out, '--naive_epochs', '3', '--stage3_epochs', '3', '--figure_samples', '0',
                                    '--slurm_time', '1', '--slurm_signal_delay', '20', '--slurm_max_requeues', '8']
    args[args.index('--ratios') + 1:args.index('--ratios') + 3] = ['10']
    hook, markers = tmp_path / 'hook', tmp_path / 'stalls'
    hook.mkdir()
    markers.mkdir()
    (hook / 'sitecustomize.py').write_text(STALL_HOOK)
    proc = slurm_run(slurm, args, background=True, env_extra={
        'PYTHONPATH': str(hook), 'LRB_TEST_STALL': str(markers), 'LRB_TEST_STALL_ONCE': 'acc10-naive-wrel'})
    stage3 = out / 'stages' / 'acc10-lrb-stage3'
    wait_for(lambda: (markers / stage3.name).is_file() or proc.poll() is not None, 180, "stage 3's first checkpoint")
    assert (stage3 / 'model_last_RMSIN.pth').is_file(), proc.communicate()
    job = read(out / 'slurm' / 'jobs.json')['steps'][stage3.name]['job_id']
    subprocess.run(['scancel', job], check=True, env=dict(os.environ, **slurm.env))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2 and 'Traceback' not in stderr, stdout[-3000:] + stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert re.match(rf'reproduce.py: error: step acc10-lrb-stage3 \(job {job}\) ended without finishing '
                    rf'\(CANCELLED\S*\); log: \S+acc10-lrb-stage3.log', line), line
    assert re.search(r'acc10-lrb-wrel-val \(job \d+\): cancelled, it needs acc10-lrb-stage3', stdout)
    assert sorted(job_lines(stdout)) == sorted(['acc10-naive-wrel', 'acc10-naive-wrel-val', 'acc10-naive-wrel-test',
                                                'acc10-lrb-stage3', 'acc10-lrb-wrel-val', 'acc10-lrb-wrel-test'])
    naive_log = (out / 'logs' / 'acc10-naive-wrel.log').read_text()
    assert 'stopped for a requeue' in naive_log and 'attempt 2' in naive_log
    resumed = [int(e) for e in re.findall(r'continuing at epoch (\d+)', naive_log)]
    assert resumed and resumed[0] > 0  # continued, not restarted
    assert (out / 'stages' / 'acc10-naive-wrel' / 'stage.json').is_file()
    for split in ('val', 'test'):  # the requeued job's tests waited for it, then ran
        assert re.search(rf'acc10-naive-wrel-{split} \(job \d+\): done', stdout), stdout

    # the time limit is not part of a step's configuration: the re-run gives the jobs room (on a loaded machine
    # stage 3's single epoch may not fit in a 1-minute job); nothing stalls now
    again = slurm_run(slurm, args + ['--slurm_time', '10'])
    assert sorted(job_lines(again.stdout)) == ['acc10-lrb-stage3', 'acc10-lrb-wrel-test', 'acc10-lrb-wrel-val']
    assert 'acc10-lrb-stage3: job' in again.stdout and 'continues from model_last_RMSIN.pth' in again.stdout
    stage3_log = (out / 'logs' / 'acc10-lrb-stage3.log').read_text()
    assert int(re.findall(r'continuing at epoch (\d+)', stage3_log)[-1]) > 0
    assert all(r['oIoU_test'] is not None for r in read(out / 'table.json')['rows'])


def test_slurm_failing_step_is_one_line_and_cancels_its_dependents(slurm, demo_root, small_bert_dir, tmp_path):
    out = tmp_path / 'out'
    args = pipeline_args(demo_root, small_bert_dir, out, '--extra_args', '--cross_scale bogus')
    args[args.index('--ratios') + 1:args.index('--ratios') + 3] = ['10']
    proc = slurm_run(slurm, args, check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"reproduce.py: error: step acc10-(only-accurate|naive-wrel) \(job \d+\) failed \(exit 2\): "
                    r"train.py: error: argument --cross_scale: invalid choice: 'bogus'.*; log: \S+\.log", line), line
    cancelled = re.findall(r'\] (\S+) \(job \d+\): cancelled, it needs', proc.stdout)
    assert 'acc10-lrb-stage2' in cancelled or 'acc10-naive-wrel-val' in cancelled
    live = subprocess.run(['squeue', '-h'], capture_output=True, text=True, env=dict(os.environ, **slurm.env))
    assert live.stdout.strip() == ''  # nothing left pending forever


def test_slurm_bad_input_is_one_line_before_anything_is_submitted(slurm, demo_root, small_bert_dir, tmp_path):
    base = [str(a) for a in pipeline_args(demo_root, small_bert_dir, tmp_path / 'out')]
    del base[base.index('--jobs'):base.index('--jobs') + 2]
    before = len(slurm.completions())

    def line(*extra, env=None):
        proc = run(base + ['--launcher', 'slurm', *extra], check=False, env_extra=env or slurm.env)
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
        return proc.stderr.strip().splitlines()[-1]

    assert line('--slurm_partition', 'gpu-a100') == ('reproduce.py: error: --slurm_partition gpu-a100: SLURM has no '
                                                      'such partition (it has: debug)')
    assert line('--seeds', '1', '2', '1') == 'reproduce.py: error: --seeds: 1 is given twice'
    assert line('--slurm_time', '1', '--slurm_signal_delay', '45').startswith(
        'reproduce.py: error: --slurm_signal_delay 45: with --slurm_time 1 (minutes) SLURM may signal the job')
    (tmp_path / 'bare').mkdir()  # a PATH without SLURM's commands (reproduce.py runs by its full path)
    no_slurm = {**slurm.env, 'PATH': str(tmp_path / 'bare')}
    assert line(env=no_slurm).startswith('reproduce.py: error: --launcher slurm: no sbatch on this machine')
    assert line('--jobs', '2').startswith('reproduce.py: error: --jobs 2: steps can run side by side only on CPU '
                                          'with --launcher local')
    # a time limit below one epoch as an earlier attempt measured it (its log line, as train.py writes it)
    (tmp_path / 'out' / 'logs').mkdir(parents=True)
    (tmp_path / 'out' / 'pipeline.json').write_text('{}')
    (tmp_path / 'out' / 'logs' / 'acc10-naive-wrel.log').write_text('Epoch 0: train loss 0.61, 95s (val)\n')
    assert line('--slurm_time', '1', '--slurm_signal_delay', '10') == (
        f"reproduce.py: error: --slurm_time 1: one epoch of acc10-naive-wrel took 95 s "
        f"({tmp_path / 'out' / 'logs' / 'acc10-naive-wrel.log'}), more than the 20 s a job is sure to have before "
        f"it is told to stop (--slurm_signal_delay 10 + 30 s); it could never write a checkpoint")
    assert len(slurm.completions()) == before and not (tmp_path / 'out' / 'slurm').exists()
