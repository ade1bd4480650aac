"""Reliability, round 2 (issue 20), through the real command lines: output names of predict.py unique by
construction, the best checkpoint surviving a SIGKILL at any instant of the save, and reproduce.py's steps
dying with it (and a step folder in use refused). Kills are real SIGKILLs at a named instant: a
`sitecustomize` put on the child's PYTHONPATH wraps the function at that instant and kills the process there."""
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tests'))

import test_predict  # noqa: E402
from test_reliability import train_args  # noqa: E402
from tests import script_server  # noqa: E402

nano, run_predict = test_predict.nano, test_predict.run_predict  # nano: a module fixture, a random nano model


# ------------------------------------------------------------------------------------------------
# data loss: predict.py output names


def test_predict_output_names_are_unique_and_match_predictions_jsonl(nano, tmp_path):
    ckpt, _, _ = nano
    sizes = {'a/x.jpg': (40, 30), 'b/x.jpg': (24, 50), 'c/x-2.jpg': (70, 20), 'd/X.png': (33, 33)}
    paths = []
    for k, (name, size) in enumerate(sizes.items()):
        path = tmp_path / name
        path.parent.mkdir()
        Image.fromarray(np.full((size[1], size[0], 3), 40 * k, np.uint8)).save(path)
        paths.append(path)
    out = tmp_path / 'out'
    proc = run_predict(['--resume', ckpt, '--image', *paths, '--out', out, '--device', 'cpu', '--expression', 'a tank'])
    records = [json.loads(line) for line in (out / 'predictions.jsonl').read_text().splitlines()]
    assert [r['image'] for r in records] == [str(p) for p in paths]
    names = [r[kind] for r in records for kind in ('mask', 'overlay')]
    assert len({n.casefold() for n in names}) == len(names) == 8, names  # unique, even on a case-blind disk
    assert sorted(os.listdir(out)) == sorted(names + ['predictions.jsonl'])
    for record, (w, h) in zip(records, sizes.values()):  # each file is its own image's, not overwritten
        assert Image.open(out / record['mask']).size == (w, h) == (record['width'], record['height'])
    assert '4 masks and overlays written' in proc.stderr


# ------------------------------------------------------------------------------------------------
# data loss: the best checkpoint after a SIGKILL

HOOK = '''
import json, os, signal, sys
sys.path.insert(0, {repo!r})
from lib.training import checkpoint, engine

_copy, _save, _evaluate = checkpoint.copy_atomic, checkpoint.save_checkpoint, engine.evaluate
_scores = {{int(k): v for k, v in json.loads(os.environ.get('LRB_TEST_SCORES', '{{}}')).items()}}
_writes = int(os.environ.get('LRB_TEST_KILL_NTH', '1'))


def _kill_at(path):  # SIGKILL as the n-th write of the named file starts (the files written before are on disk)
    global _writes
    if os.path.basename(path) == os.environ.get('LRB_TEST_KILL_AT'):
        _writes -= 1
        if _writes == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def copy_atomic(src, dst):  # model_best*, model_epoch_N
    _kill_at(dst)
    return _copy(src, dst)


def save_checkpoint(state, path, *args, **kwargs):  # model_last, stage 3's best banks
    _kill_at(path)
    return _save(state, path, *args, **kwargs)


def evaluate(predict, loader, device, desc='Val'):  # validation scores chosen per epoch
    meter = _evaluate(predict, loader, device, desc=desc)
    epoch = int(desc.split()[-1])
    if epoch in _scores:
        summary = meter.summary()
        summary.update(oIoU=_scores[epoch][0], mIoU=_scores[epoch][1])
        meter.summary = lambda: summary
    return meter


checkpoint.copy_atomic, checkpoint.save_checkpoint, engine.evaluate = copy_atomic, save_checkpoint, evaluate
'''


def hooked(tmp_path, script, args, kill_at=None, nth=1, scores=None):
    """`script` with the hook above: SIGKILL when it starts writing the file named `kill_at` for the `nth` time
    (a copy or a torch.save); `scores` {epoch: (oIoU, mIoU)} replace the validation scores."""
    hook = tmp_path / 'hook'
    hook.mkdir(exist_ok=True)
    (hook / 'sitecustomize.py').write_text(HOOK.format(repo=str(REPO)))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', PYTHONPATH=str(hook),
               LRB_TEST_SCORES=json.dumps(scores or {}), LRB_TEST_KILL_AT=kill_at or '', LRB_TEST_KILL_NTH=str(nth))
    return script_server.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_killed_while_copying_model_best_keeps_the_best_epoch(demo_root, small_bert_dir, tmp_path):
    out = tmp_path / 'out'
    scores = {0: (0.9, 0.9), 1: (0.1, 0.1)}  # epoch 0 is the best, and the later ones worse
    args = train_args(demo_root, small_bert_dir, out, epochs=2)
    proc = hooked(tmp_path, 'train.py', args, kill_at='model_best_demo.pth', scores=scores)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    best_weights = load(out / 'model_last_demo.pth')  # epoch 0's, saved just before the kill
    assert best_weights['epoch'] == 0 and not (out / 'model_best_demo.pth').exists()
    proc = hooked(tmp_path, 'train.py', [*args, '--resume', out / 'model_last_demo.pth'], scores=scores)
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert load(out / 'model_last_demo.pth')['epoch'] == 1 and 'restored ' in proc.stderr
    best = load(out / 'model_best_demo.pth')
    assert best['epoch'] == 0 and same_weights(best['model'], best_weights['model'])
    assert same_weights(best['bert_model'], best_weights['bert_model'])


def test_stage3_killed_while_writing_its_best_files_keeps_the_best_epochs_and_their_banks(nano, demo_root,
                                                                                         small_bert_dir, tmp_path):
    """Stage 3 saves an epoch as model_last, then per improved metric (mIoU, then oIoU) its best bank, then the
    copy to model_best. Killed twice: as epoch 1 (the best of both) starts writing the mIoU bank, so no best file
    of it exists; then, resumed (which restores them), as epoch 2 (the best oIoU, a worse mIoU) copies
    model_best_oIoU, its bank written already. Resumed to the end, each best checkpoint and its bank hold the
    best epoch of any attempt: epoch 2 for oIoU, epoch 1 for mIoU (whose bank no later epoch rewrites)."""
    from refer.refer import load_refs
    stage1, _, _ = nano  # a stage-1 teacher: 'model' and 'bert_model'
    train_ids = [r['ref_id'] for r in load_refs(str(demo_root / 'rrsisd' / 'refs(unc).p')) if r['split'] == 'train']
    bank = tmp_path / 'bank.pt'  # 4 weak refs (the demo root has no class-name expressions of its own)
    torch.save({'embedding': torch.randn(4, 20, 32) * 0.02,
                'sample_id_to_index': {r: i for i, r in enumerate(train_ids[:4])}}, bank)
    out = tmp_path / 'out'
    last = out / 'model_last_demo.pth'
    scores = {0: (0.5, 0.5), 1: (0.9, 0.9), 2: (0.95, 0.1)}
    args = train_args(demo_root, small_bert_dir, out, '--model', 'lavt', '--caption_lr', '1e-2', epochs=3)

    def attempt(resume, **kill):
        proc = hooked(tmp_path, 'train_stu_tea.py', [*args, '--resume', resume, *(
            ['--caption_embedding_path', bank] if resume == stage1 else [])], scores=scores, **kill)
        assert proc.returncode == (-signal.SIGKILL if kill else 0), proc.stderr[-3000:]
        assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
        return proc, load(last)

    def best_epoch(metric):
        return load(out / f'model_best_{metric}_demo.pth')['epoch']

    def best_bank(metric):
        return load(out / f'caption_embeddings_demo_{metric}_best.pt')

    _, first = attempt(stage1, kill_at='caption_embeddings_demo_mIoU_best.pt', nth=2)  # epoch 0 writes it first
    assert first['epoch'] == 1 and first['best_metrics'] == ['mIoU', 'oIoU']
    assert best_epoch('mIoU') == best_epoch('oIoU') == 0
    assert not torch.equal(best_bank('mIoU')['embedding'], first['caption_bank']['embedding'])  # epoch 0's

    proc, second = attempt(last, kill_at='model_best_oIoU_demo.pth', nth=2)  # the restore copies it first
    assert f"restored {out / 'model_best_mIoU_demo.pth'}" in proc.stderr
    assert f"restored {out / 'model_best_oIoU_demo.pth'}" in proc.stderr
    assert second['epoch'] == 2 and second['best_metrics'] == ['oIoU']
    assert best_epoch('oIoU') == 1  # restored from the first attempt's epoch 1 ...
    assert torch.equal(best_bank('oIoU')['embedding'], second['caption_bank']['embedding'])  # ... beside epoch 2's bank

    proc, _ = attempt(last)  # nothing left to train: restores, then ends
    assert 'nothing to do' in proc.stderr and f"restored {out / 'model_best_oIoU_demo.pth'}" in proc.stderr
    for metric, killed in (('oIoU', second), ('mIoU', first)):
        best = load(out / f'model_best_{metric}_demo.pth')
        assert best['epoch'] == killed['epoch'], metric
        for key in ('student_model', 'teacher_model', 'bert_model'):
            assert same_weights(best[key], killed[key]), (metric, key)
        assert torch.equal(best_bank(metric)['embedding'], killed['caption_bank']['embedding']), metric
        assert best_bank(metric)['sample_id_to_index'] == killed['caption_bank']['sample_id_to_index']


# ------------------------------------------------------------------------------------------------
# leftover processes: reproduce.py's steps die with it


def alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(')')[-1].split()[0] != 'Z'
    except OSError:
        return False


SILENT_STEP = """
import os, sys, time
if sys.argv[0].endswith('train.py') and os.environ.get('LRB_TEST_READY'):  # a step that prints nothing for long
    open(os.path.join(os.environ['LRB_TEST_READY'], str(os.getpid())), 'w').close()
    time.sleep(60)
"""


def test_reproduce_killed_takes_its_running_step_with_it(demo_root, small_bert_dir, tmp_path):
    """A step that writes nothing meanwhile (no broken pipe to end it) must still end with reproduce.py."""
    import time
    from test_reproduce import pipeline_args
    hook, ready = tmp_path / 'hook', tmp_path / 'ready'
    hook.mkdir()
    ready.mkdir()
    (hook / 'sitecustomize.py').write_text(SILENT_STEP)
    args = pipeline_args(demo_root, small_bert_dir, tmp_path / 'out', '--jobs', '1')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', PYTHONPATH=str(hook), LRB_TEST_READY=str(ready))
    proc = subprocess.Popen([sys.executable, str(REPO / 'reproduce.py'), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    steps = []
    try:
        end = time.time() + 120
        while not (steps := [int(n) for n in os.listdir(ready)]):  # a train.py step is running
            assert proc.poll() is None and time.time() < end, 'no train.py step ever started'
            time.sleep(0.05)
        proc.kill()  # SIGKILL: reproduce.py cannot clean up itself
        proc.wait(30)
        end = time.time() + 10  # the silent step would sleep 60 s
        while any(alive(p) for p in steps) and time.time() < end:
            time.sleep(0.1)
        assert not any(alive(p) for p in steps), f'step {steps} runs on as an orphan'
    finally:  # whatever happened, nothing of this test runs on
        proc.kill()
        proc.wait(30)
        for pid in steps:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
