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

_copy, _evaluate = checkpoint.copy_atomic, engine.evaluate
_scores = {{int(k): v for k, v in json.loads(os.environ.get('LRB_TEST_SCORES', '{{}}')).items()}}


def copy_atomic(src, dst):  # SIGKILL as the copy of the named file starts (its earlier files are on disk)
    if os.path.basename(dst) == os.environ.get('LRB_TEST_KILL_COPY'):
        os.kill(os.getpid(), signal.SIGKILL)
    return _copy(src, dst)


def evaluate(predict, loader, device, desc='Val'):  # validation scores chosen per epoch
    meter = _evaluate(predict, loader, device, desc=desc)
    epoch = int(desc.split()[-1])
    if epoch in _scores:
        summary = meter.summary()
        summary.update(oIoU=_scores[epoch][0], mIoU=_scores[epoch][1])
        meter.summary = lambda: summary
    return meter


checkpoint.copy_atomic, engine.evaluate = copy_atomic, evaluate
'''


def hooked(tmp_path, script, args, kill_copy=None, scores=None):
    """`script` with the hook above: SIGKILL when it starts copying to the file named `kill_copy`;
    `scores` {epoch: (oIoU, mIoU)} replace the validation scores."""
    hook = tmp_path / 'hook'
    hook.mkdir(exist_ok=True)
    (hook / 'sitecustomize.py').write_text(HOOK.format(repo=str(REPO)))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', PYTHONPATH=str(hook),
               LRB_TEST_SCORES=json.dumps(scores or {}), LRB_TEST_KILL_COPY=kill_copy or '')
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_killed_while_copying_model_best_keeps_the_best_epoch(demo_root, small_bert_dir, tmp_path):
    out = tmp_path / 'out'
    scores = {0: (0.9, 0.9), 1: (0.1, 0.1)}  # epoch 0 is the best, and the later ones worse
    args = train_args(demo_root, small_bert_dir, out, epochs=2)
    proc = hooked(tmp_path, 'train.py', args, kill_copy='model_best_demo.pth', scores=scores)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    best_weights = load(out / 'model_last_demo.pth')  # epoch 0's, saved just before the kill
    assert best_weights['epoch'] == 0 and not (out / 'model_best_demo.pth').exists()
    proc = hooked(tmp_path, 'train.py', [*args, '--resume', out / 'model_last_demo.pth'], scores=scores)
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert load(out / 'model_last_demo.pth')['epoch'] == 1 and 'restored ' in proc.stderr
    best = load(out / 'model_best_demo.pth')
    assert best['epoch'] == 0 and same_weights(best['model'], best_weights['model'])
    assert same_weights(best['bert_model'], best_weights['bert_model'])


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
