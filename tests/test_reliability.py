"""Reliability (issue 12): bad inputs and faults against train.py, test.py and mask_train_only.py,
through their real command lines, on small generated data (nano Swin, 64 px, the small BERT).

What a user may see when something is wrong: one line `prog: error: ...` (after the run's own log
lines), a non-zero exit, and never a traceback. Classes:
 1 data loss        a finished run is never replaced without --resume / --overwrite
 2 fail early       output folder, free space, every mask and image header checked before the first step;
                    later write errors name the path and the cause
 3 malformed fields / 4 silently wrong data: one line naming the file, the id and the field
 5 DataLoader workers: the same one line as with --workers 0
 6 messages         checkpoints that are not torch files, refused globals, flag values
 7 leftovers        temporaries of killed runs are removed on the next start, and only those
 8 Ctrl-C           one line naming the last checkpoint and how to resume
The disk tests mount small tmpfs folders and skip where that is not allowed.
"""
import argparse
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import utils  # noqa: E402
from lib import files  # noqa: E402
from lib.training import checkpoint  # noqa: E402
from refer import check  # noqa: E402
from refer.refer import load_refs  # noqa: E402
from tests import script_server  # noqa: E402


# ------------------------------------------------------------------------------------------------
# helpers

def run(script, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return script_server.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles, script=None):
    """Non-zero exit, no traceback anywhere, exactly one `error:` line, the last one, holding `needles`."""
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, None), out[-3000:]
    assert 'Traceback' not in out, out[-5000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ': error: ' in ln]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
    if script:
        assert errors[0].startswith(f'{script}: error: '), errors[0]
    for needle in needles:
        assert str(needle) in errors[0], f'{needle!r} not in {errors[0]!r}'
    return errors[0]


def assert_no_training(proc):
    assert 'Epoch: [' not in proc.stderr and 'saved ' not in proc.stderr, proc.stderr[-3000:]


def model_args(demo_root, small_bert_dir, root=None):
    return ['--device', 'cpu', '--dataset', 'rrsisd', '--refer_data_root', root or demo_root, '--swin_type', 'nano',
            '--img_size', 64, '--pretrained_swin_weights', '', '--bert_tokenizer', small_bert_dir,
            '--ck_bert', small_bert_dir, '--workers', 0]


def train_args(demo_root, small_bert_dir, out, *extra, root=None, epochs=1):
    return model_args(demo_root, small_bert_dir, root) + ['--epochs', epochs, '--batch-size', 4, '--output-dir', out,
                                                          '--model_id', 'demo', '--print-freq', 2, *extra]


def make_root(demo_root, dst, edit=None, copy_images=False):
    """A copy of the demo data root whose refs / instances `edit(refs, instances, image_dir)` changes."""
    (dst / 'rrsisd').mkdir(parents=True)
    image_dir = dst / 'images' / 'rrsisd' / 'JPEGImages'
    if copy_images:
        shutil.copytree(demo_root / 'images', dst / 'images')
    else:
        (dst / 'images').symlink_to(demo_root / 'images')
    refs = load_refs(str(demo_root / 'rrsisd' / 'refs(unc).p'))
    instances = json.loads((demo_root / 'rrsisd' / 'instances.json').read_text())
    if edit is not None:
        edit(refs, instances, image_dir)
    with open(dst / 'rrsisd' / 'refs(unc).p', 'wb') as f:
        pickle.dump(refs, f)
    (dst / 'rrsisd' / 'instances.json').write_text(json.dumps(instances))
    return dst


def raw_refs(root):
    with open(root / 'rrsisd' / 'refs(unc).p', 'rb') as f:
        return pickle.load(f)  # as written, even when broken


def first(refs, split):
    return next(r for r in refs if r['split'] == split)


def ann_of(instances, ref):
    return next(a for a in instances['annotations'] if a['id'] == ref['ann_id'])


def image_of(instances, ref):
    return next(i for i in instances['images'] if i['id'] == ref['image_id'])


@contextlib.contextmanager
def tmpfs(path, size, read_only=False):
    """A size-limited tmpfs at `path`; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f'size={size}' + (',ro' if read_only else '')
    try:
        proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f'cannot mount a tmpfs here ({e})')
    if proc.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({proc.stderr.strip()})')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], capture_output=True, timeout=30)


class LineReader:
    """Collects a Popen's stderr lines in a thread; wait_for(text) blocks until a line holds it."""

    def __init__(self, proc):
        self.proc, self.lines, self.cond = proc, [], threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_for(self, text, timeout=240):
        end = time.time() + timeout
        with self.cond:
            while not any(text in ln for ln in self.lines):
                if self.proc.poll() is not None and not self.thread.is_alive() or time.time() > end:
                    raise AssertionError(f'{text!r} never came:\n' + ''.join(self.lines)[-3000:])
                self.cond.wait(0.2)

    def text(self):
        self.thread.join(60)
        return ''.join(self.lines)


def popen_train(args):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, str(REPO / 'train.py'), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


# ------------------------------------------------------------------------------------------------
# one trained run shared by several tests


@pytest.fixture(scope='module')
def trained(demo_root, small_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('rel_train') / 'run'
    proc = run('train.py', *train_args(demo_root, small_bert_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------------------
# 1. data loss


def test_second_run_without_resume_is_refused_and_keeps_the_finished_run(trained, demo_root, small_bert_dir):
    best = trained / 'model_best_demo.pth'
    before = (best.stat().st_mtime_ns, best.read_bytes()[-4096:])
    proc = run('train.py', *train_args(demo_root, small_bert_dir, trained))
    line = assert_one_line_error(proc, str(trained), 'model_last_demo.pth', '--resume', '--overwrite',
                                 script='train.py')
    assert proc.stderr.strip() == line  # refused before anything else: nothing else printed
    assert (best.stat().st_mtime_ns, best.read_bytes()[-4096:]) == before


def test_overwrite_replaces_the_run_and_its_logs(trained, demo_root, small_bert_dir, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(trained, out)
    old_events = sorted(os.listdir(out / 'tb_demo'))
    old = torch.load(out / 'model_best_demo.pth', weights_only=True)
    proc = run('train.py', *train_args(demo_root, small_bert_dir, out, '--overwrite', '--seed', 5, '--lr', 1e-3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = torch.load(out / 'model_best_demo.pth', weights_only=True)
    assert new['args']['seed'] == 5 and old['args']['seed'] != 5
    assert not set(old_events) & set(os.listdir(out / 'tb_demo'))  # the old run's event files are gone


def test_guard_run_dir_protects_every_file_the_run_would_write(tmp_path):
    names = checkpoint.run_file_names('a', 40)
    assert names[:2] == ['model_last_a.pth', 'model_best_a.pth'] and 'model_epoch_35.pth' in names
    assert 'model_epoch_15.pth' not in checkpoint.run_file_names('a', 12)
    (tmp_path / 'model_epoch_10.pth').write_bytes(b'another run')  # epoch files carry no model id
    with pytest.raises(utils.InputError, match='holds model_epoch_10.pth of a finished run'):
        files.guard_run_dir(tmp_path, checkpoint.run_file_names('b', 40))
    files.guard_run_dir(tmp_path, checkpoint.run_file_names('b', 10))       # stops before epoch 10: fine
    files.guard_run_dir(tmp_path, names, resume=str(tmp_path / 'x.pth'))  # the user asked to continue
    files.guard_run_dir(tmp_path, names, overwrite=True)
    with pytest.raises(utils.InputError) as refused:  # a stage script, whose --resume is its teacher
        files.guard_run_dir(tmp_path, checkpoint.run_file_names('b', 40), resume_flag=None)
    assert 'pass --overwrite to replace it' in str(refused.value) and '--resume' not in str(refused.value)
    assert sorted(os.listdir(tmp_path)) == ['model_epoch_10.pth']        # the guard creates nothing
    files.guard_run_dir(tmp_path / 'new' / 'deeper', names)
    assert not (tmp_path / 'new').exists()


def test_test_py_keeps_earlier_metrics_and_overlays_and_says_what_it_loads(trained, demo_root, small_bert_dir,
                                                                          tmp_path):
    ckpt = trained / 'model_last_demo.pth'
    metrics, vis = tmp_path / 'metrics.json', tmp_path / 'vis'
    args = model_args(demo_root, small_bert_dir) + ['--resume', ckpt, '--split', 'val', '--results_json', metrics,
                                                    '--vis_dir', vis, '--vis_num', 2]
    proc = run('test.py', *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Randomly initialize' not in proc.stdout + proc.stderr
    assert f'from the checkpoint {ckpt}' in proc.stdout
    assert f"weights: 'model' and 'bert_model' loaded from {ckpt} (epoch 0)" in proc.stderr
    first_metrics = metrics.read_bytes()
    assert_one_line_error(run('test.py', *args), str(metrics), 'exists', '--overwrite', script='test.py')
    assert metrics.read_bytes() == first_metrics
    metrics.unlink()
    assert_one_line_error(run('test.py', *args), '--vis_dir', '00000_s0.png', '--overwrite')
    assert not metrics.exists()
    proc = run('test.py', *args, '--overwrite')
    assert proc.returncode == 0 and json.loads(metrics.read_text())['split'] == 'val', proc.stderr[-2000:]


def test_resume_says_where_the_weights_come_from(trained, demo_root, small_bert_dir, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(trained, out)
    proc = run('train.py', *train_args(demo_root, small_bert_dir, out, '--resume', out / 'model_last_demo.pth'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Randomly initialize' not in proc.stdout and 'from the checkpoint' in proc.stdout
    assert 'nothing to do' in proc.stderr  # epoch 0 of 1 was finished


# ------------------------------------------------------------------------------------------------
# 2. failing at the start instead of after an epoch


def test_output_dir_that_is_a_file_or_under_one(trained, demo_root, small_bert_dir, tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    for out, needle in ((a_file, 'is a file, not a folder'), (a_file / 'sub', 'which is a file')):
        proc = run('train.py', *train_args(demo_root, small_bert_dir, out))
        assert_one_line_error(proc, str(out), needle, script='train.py')
    proc = run('test.py', *model_args(demo_root, small_bert_dir), '--resume', trained / 'model_last_demo.pth',
               '--results_json', a_file / 'm.json')
    assert_one_line_error(proc, '--results_json', 'a_file')


def test_read_only_output_and_metrics_paths_fail_before_any_work(trained, demo_root, small_bert_dir, tmp_path):
    with tmpfs(tmp_path / 'ro', '1m', read_only=True) as ro:
        proc = run('train.py', *train_args(demo_root, small_bert_dir, ro / 'out'))
        assert_one_line_error(proc, str(ro / 'out'), 'Read-only file system', script='train.py')
        assert_no_training(proc)
        proc = run('test.py', *model_args(demo_root, small_bert_dir), '--resume', trained / 'model_last_demo.pth',
                   '--results_json', ro / 'metrics.json')
        assert_one_line_error(proc, '--results_json', str(ro), 'Read-only file system', script='test.py')
        assert 'data check' not in proc.stderr  # before the data, the model and the evaluation
        proc = run('mask_train_only.py', '--refer_data_root', demo_root, '--output_dir', ro / 'splits')
        assert_one_line_error(proc, '--output_dir', 'Read-only file system')


def test_disk_too_small_for_checkpoints_fails_before_training(demo_root, small_bert_dir, tmp_path):
    with tmpfs(tmp_path / 'small', '100m') as disk:
        out = disk / 'out'
        proc = run('train.py', *train_args(demo_root, small_bert_dir, out))
        assert_one_line_error(proc, str(out), 'free', '3 checkpoints of about', script='train.py')
        assert_no_training(proc)
        assert not out.exists()  # not even an empty TensorBoard folder


def test_disk_filling_at_a_later_checkpoint_names_path_and_cause_and_keeps_the_last(demo_root, small_bert_dir,
                                                                                    tmp_path):
    with tmpfs(tmp_path / 'disk', '240m') as disk:  # room for the 3 checkpoints the start-up check asks for
        out = disk / 'out'
        proc = popen_train(train_args(demo_root, small_bert_dir, out, epochs=6))
        reader = LineReader(proc)
        try:
            reader.wait_for('saved ')  # epoch 0's checkpoints are on disk: now the disk fills up
            with open(disk / 'filler', 'wb') as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b'\0' * (1 << 20))
                        f.flush()
            os.truncate(disk / 'filler', max(0, os.path.getsize(disk / 'filler') - (256 << 10)))  # logs still fit
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        stderr = reader.text()
        done = subprocess.CompletedProcess(proc.args, proc.returncode, '', stderr)
        line = assert_one_line_error(done, str(out), 'No space left on device', script='train.py')
        assert '.pth' in line
        saved = stderr.count('saved ')
        ck = torch.load(out / 'model_last_demo.pth', weights_only=True)  # intact, and the last one saved
        assert ck['epoch'] == saved - 1 and saved < 6
        assert not [n for n in os.listdir(out) if n.startswith('.')]  # no temporary left behind


def _val_segmentation(segmentation):
    def edit(refs, instances, image_dir):
        ann_of(instances, first(refs, 'val'))['segmentation'] = segmentation
    return edit


def test_bad_val_mask_fails_before_the_first_epoch(demo_root, small_bert_dir, tmp_path):
    root = make_root(demo_root, tmp_path / 'data', _val_segmentation([[1, 1, 5, 5]]))
    val = first(raw_refs(root), 'val')
    out = tmp_path / 'out'
    proc = run('train.py', *train_args(demo_root, small_bert_dir, out, root=root))
    assert_one_line_error(proc, 'instances.json', f"annotation {val['ann_id']} (ref {val['ref_id']})",
                          "'segmentation' polygon 0 has 2 point(s)", script='train.py')
    assert_no_training(proc)
    assert not out.exists()


def test_unreadable_or_missing_images_fail_before_the_first_epoch(demo_root, small_bert_dir, tmp_path):
    def edit(refs, instances, image_dir):
        (image_dir / image_of(instances, first(refs, 'val'))['file_name']).write_bytes(b'not a jpeg at all')
        os.remove(image_dir / image_of(instances, [r for r in refs if r['split'] == 'val'][1])['file_name'])
    root = make_root(demo_root, tmp_path / 'data', edit, copy_images=True)
    val = first(raw_refs(root), 'val')
    proc = run('train.py', *train_args(demo_root, small_bert_dir, tmp_path / 'out', '--workers', 2, root=root))
    assert_one_line_error(proc, f'of ref {val["ref_id"]}', 'cannot be read', '(and 1 more problems', script='train.py')
    assert_no_training(proc)


# ------------------------------------------------------------------------------------------------
# 3. malformed fields, 4. silently wrong data: through mask_train_only.py (no torch: fast) and train.py


def _set_sentence(value):
    def edit(refs, instances, image_dir):
        first(refs, 'val')['sentences'] = [value]
    return edit


def _edit_sentence(fn):
    def edit(refs, instances, image_dir):
        fn(first(refs, 'val')['sentences'][0])
    return edit


def _drop(kind, field):
    def edit(refs, instances, image_dir):
        ref = first(refs, 'val')
        record = {'images': image_of, 'annotations': ann_of}[kind](instances, ref) if kind != 'categories' \
            else instances['categories'][0]
        del record[field]
    return edit


def _rle(size, counts):
    return _val_segmentation({'size': size, 'counts': counts})


def _ann_on_other_image(refs, instances, image_dir):
    ref = first(refs, 'val')
    ann_of(instances, ref)['image_id'] = first(refs, 'test')['image_id']


_RLE_32 = mask_utils.encode(np.asfortranarray(np.ones((32, 32), np.uint8)))['counts'].decode()

# name -> (edit, text the error line must hold; {ref}, {ann}, {image} are the val ref's ids)
FIELD_CASES = {
    'sentence_none': (_set_sentence(None), ['refs(unc).p', 'ref {ref}: sentences[0] is None, not a dict']),
    'sentence_not_dict': (_set_sentence('a string'), ['ref {ref}: sentences[0] is a str, not a dict']),
    'sentence_without_raw': (_edit_sentence(lambda s: s.pop('raw')), ["ref {ref}: sentences[0] has no 'raw'"]),
    'raw_not_a_string': (_edit_sentence(lambda s: s.update(raw=7)), ["sentences[0]['raw'] is an int, not a string"]),
    'image_without_file_name': (_drop('images', 'file_name'), ['instances.json', "image {image} has no 'file_name'"]),
    'annotation_without_id': (_drop('annotations', 'id'), ['instances.json', "annotations[", "has no 'id'"]),
    'category_without_name': (_drop('categories', 'name'), ["category 0 has no 'name'"]),
    'polygon_of_strings': (_val_segmentation([['1', '2', '3', '4', '5', '6']]),
                           ["annotation {ann} (ref {ref}): 'segmentation' polygon 0 holds a str"]),
    'polygon_of_two_points': (_val_segmentation([[1, 1, 9, 9]]), ["'segmentation' polygon 0 has 2 point(s)"]),
    'rle_not_decoding': (_rle([64, 64], '!!bad'), ['annotation {ann}', 'not a valid compressed RLE string']),
    'rle_too_short': (_rle([64, 64], [10, 20]), ['annotation {ann}', 'cover 30 pixels, not height x width = 4096']),
    # 4. silently wrong data
    'rle_size_differs_from_image': (_rle([32, 32], _RLE_32),
                                    ["annotation {ann} (ref {ref})", 'RLE size [32, 32] differs', '[64, 64]']),
    'annotation_on_another_image': (_ann_on_other_image, ['ref {ref}: annotation {ann} lies on image']),
}


def _expected(texts, root):
    ref = first(raw_refs(root), 'val')
    return [t.format(ref=ref['ref_id'], ann=ref['ann_id'], image=ref['image_id']) for t in texts]


@pytest.mark.parametrize('case', list(FIELD_CASES))
def test_malformed_or_inconsistent_fields_are_one_line_in_mask_train_only(demo_root, tmp_path, case):
    edit, texts = FIELD_CASES[case]
    root = make_root(demo_root, tmp_path / 'data', edit)
    out = tmp_path / 'splits'
    proc = run('mask_train_only.py', '--refer_data_root', root, '--output_dir', out, '--ratios', 50)
    assert_one_line_error(proc, *_expected(texts, root), script='mask_train_only.py')
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ['data']  # nothing broken copied out


@pytest.mark.parametrize('case', ['sentence_none', 'raw_not_a_string', 'annotation_without_id', 'polygon_of_strings',
                                  'rle_size_differs_from_image', 'annotation_on_another_image'])
def test_malformed_or_inconsistent_fields_are_one_line_in_train_py(demo_root, small_bert_dir, tmp_path, case):
    edit, texts = FIELD_CASES[case]
    root = make_root(demo_root, tmp_path / 'data', edit)
    proc = run('train.py', *train_args(demo_root, small_bert_dir, tmp_path / 'out', root=root))
    assert_one_line_error(proc, *_expected(texts, root), script='train.py')
    assert_no_training(proc)
    assert not (tmp_path / 'out').exists()


def test_image_whose_real_size_differs_from_instances(demo_root, small_bert_dir, trained, tmp_path):
    def edit(refs, instances, image_dir):
        image = image_of(instances, first(refs, 'test'))
        image['width'] = image['height'] = 128
    root = make_root(demo_root, tmp_path / 'data', edit)
    ref = first(raw_refs(root), 'test')
    proc = run('test.py', *model_args(demo_root, small_bert_dir, root), '--resume', trained / 'model_last_demo.pth',
               '--results_json', tmp_path / 'm.json')
    assert_one_line_error(proc, f"(image {ref['image_id']}) of ref {ref['ref_id']}", 'is 64x64 (width x height)',
                          'says 128x128', script='test.py')
    assert not (tmp_path / 'm.json').exists()


# ------------------------------------------------------------------------------------------------
# 5. errors inside DataLoader workers


def test_worker_errors_read_like_workers_0(demo_root, small_bert_dir, trained, tmp_path):
    """A truncated JPEG: its header passes the start-up check, decoding fails in the loader."""
    def edit(refs, instances, image_dir):
        for split in ('train', 'test'):
            path = image_dir / image_of(instances, first(refs, split))['file_name']
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])  # the header stays whole
    root = make_root(demo_root, tmp_path / 'data', edit, copy_images=True)
    lines = {}
    for workers in (0, 2):
        out = tmp_path / f'out{workers}'
        proc = run('train.py', *train_args(demo_root, small_bert_dir, out, '--workers', workers, '--batch-size', 28,
                                           root=root))  # one batch: every train image
        lines[workers] = assert_one_line_error(proc, 'cannot be read', 'truncated', script='train.py')
        assert not (out / 'tb_demo').exists()  # failed before the first step: no empty log folder
    assert lines[0] == lines[2]
    proc = run('test.py', *model_args(demo_root, small_bert_dir, root), '--resume', trained / 'model_last_demo.pth',
               '--workers', 2, '--results_json', tmp_path / 'm.json')
    assert_one_line_error(proc, 'cannot be read', 'truncated', script='test.py')


def test_input_error_unwraps_the_worker_traceback():
    wrapped = ('Caught InputError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n'
               '  File "x.py", line 3, in f\n    raise InputError(m)\nutils.InputError: image file \'a.jpg\' of ref 3 '
               'cannot be read (broken)\n')
    assert str(utils.InputError(wrapped)) == "image file 'a.jpg' of ref 3 cannot be read (broken)"
    assert str(utils.InputError('plain message')) == 'plain message'


def test_run_cli_one_liners(capsys, monkeypatch):
    def fails(exc):
        def main(argv):
            raise exc
        with pytest.raises(SystemExit) as code:
            utils.run_cli(main)
        return code.value.code, capsys.readouterr().err.strip().splitlines()[-1]

    code, line = fails(RuntimeError('DataLoader worker (pid 4242) is killed by signal: Killed. '))
    assert code == 1 and 'DataLoader worker (pid 4242) is killed by signal: Killed' in line and '--workers' in line
    monkeypatch.setattr(utils, '_RUN', dict(utils._RUN, last=None, resume=None, dir=None))
    assert fails(KeyboardInterrupt())[1].endswith(': interrupted')
    utils.record_checkpoint('/runs/model_last_x.pth', epoch=4)
    code, line = fails(KeyboardInterrupt())
    assert code == 130 and line.endswith('interrupted; the last checkpoint is /runs/model_last_x.pth (epoch 4); '
                                         'continue with --resume /runs/model_last_x.pth')
    utils._RUN['resume_flag'] = None  # a stage script: its --resume is the teacher, not a continuation
    assert fails(KeyboardInterrupt())[1].endswith('the last checkpoint is /runs/model_last_x.pth (epoch 4)')
    with pytest.raises(RuntimeError, match='a real bug'):
        utils.run_cli(lambda argv: (_ for _ in ()).throw(RuntimeError('a real bug')))


# ------------------------------------------------------------------------------------------------
# 6. messages


def test_checkpoint_messages(demo_root, small_bert_dir, tmp_path):
    noise = tmp_path / 'noise.pth'
    noise.write_bytes(os.urandom(4096))
    base = model_args(demo_root, small_bert_dir) + ['--results_json', tmp_path / 'm.json']
    for extra in ([], ['--trust_checkpoint']):
        proc = run('test.py', *base, '--resume', noise, *extra)
        line = assert_one_line_error(proc, str(noise), 'not a torch checkpoint', script='test.py')
        assert 'trust_checkpoint' not in line
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'obj': argparse.ArgumentParser}, evil)
    assert_one_line_error(run('test.py', *base, '--resume', evil),
                          "refused to unpickle the global 'argparse.ArgumentParser'", '--trust_checkpoint')
    truncated = tmp_path / 'truncated.pth'
    torch.save({'model': {'w': torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-200])
    assert_one_line_error(run('test.py', *base, '--resume', truncated), 'not a readable torch checkpoint')
    assert_one_line_error(run('test.py', *base, '--resume', tmp_path), str(tmp_path), 'is a directory')


@pytest.mark.parametrize('flags, text', [
    (['--lr', 'nan'], '--lr nan: must be a finite number > 0'),
    (['--lr', '-1'], '--lr -1.0: must be a finite number > 0'),
    (['--workers', '-1'], '--workers -1: must be >= 0'),
    (['--wd', 'inf'], '--wd inf: must be a finite number >= 0'),
    (['--print-freq', '0'], '--print-freq 0: must be >= 1'),
    (['--resume', '.'], '--resume .: is a directory, not a file'),
])
def test_flag_values_are_checked_first(demo_root, small_bert_dir, tmp_path, flags, text):
    proc = run('train.py', *train_args(demo_root, small_bert_dir, tmp_path / 'out'), *flags)
    assert_one_line_error(proc, text, script='train.py')
    assert proc.stderr.strip().startswith('train.py: error:')  # nothing ran before it


# ------------------------------------------------------------------------------------------------
# 7. leftovers


OTHER_HOST = 'ffffff' if files._HOST_TAG != 'ffffff' else '000000'


def _kill_during_write(path):
    """What a kill -9 in the middle of a checkpoint write leaves behind."""
    code = ('import os, signal, sys; sys.path.insert(0, sys.argv[1]); from lib import files\n'
            'with files.atomic_file(sys.argv[2]) as tmp:\n'
            '    open(tmp, "wb").write(b"partial" * 1000)\n'
            '    os.kill(os.getpid(), signal.SIGKILL)\n')
    proc = subprocess.run([sys.executable, '-c', code, str(REPO), str(path)], timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_a_killed_checkpoint_write_is_cleaned_on_the_next_start(trained, demo_root, small_bert_dir, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(trained, out)
    _kill_during_write(out / 'model_last_demo.pth')
    (leftover,) = [n for n in os.listdir(out) if n.startswith('.model_last_demo.pth.tmp')]
    dead_pid = leftover.split('.tmp')[1].split('-')[0]
    keep = ['.notes', f'.model_best_demo.pth.tmp{os.getpid()}-{files._HOST_TAG}.pth',  # a live process's
            f'.model_best_demo.pth.tmp{dead_pid}-{OTHER_HOST}.pth',  # another machine's (shared folder)
            '.model_best_demo.pth.tmp_unrelated']
    for name in keep:
        (out / name).write_text('not ours to delete')
    proc = run('train.py', *train_args(demo_root, small_bert_dir, out, '--resume', out / 'model_last_demo.pth'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'removed 1 temporary file(s) left by killed runs in {out}: {leftover}' in proc.stderr
    assert sorted(n for n in os.listdir(out) if n.startswith('.')) == sorted(keep)
    torch.load(out / 'model_last_demo.pth', weights_only=True)  # the real checkpoint was never touched


def test_a_killed_split_build_is_cleaned_on_the_next_start(rrsisd_refs_root, tmp_path):
    out = tmp_path / 'splits'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, str(REPO / 'mask_train_only.py'), '--refer_data_root', rrsisd_refs_root,
                             '--output_dir', out], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 120
        while not [n for n in os.listdir(tmp_path) if n.startswith('.splits.tmp-')]:
            assert proc.poll() is None and time.time() < end, 'the temporary folder never appeared'
            time.sleep(0.01)
        time.sleep(0.05)
        proc.kill()
    finally:
        proc.wait(60)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith('.splits.tmp-')]
    assert leftovers and not out.exists()
    done = run('mask_train_only.py', '--refer_data_root', rrsisd_refs_root, '--output_dir', out, '--ratios', 90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'removed 1 temporary file(s) left by killed runs in {tmp_path}' in done.stderr
    assert sorted(os.listdir(tmp_path)) == ['splits']


def test_stale_temporaries_only_ours_and_only_dead(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    host = files._HOST_TAG
    ours_dead = [f'.model_last_x.pth.tmp{dead.pid}-{host}.pth', f'.model_last_x.pth.tmp{dead.pid}.pth',
                 f'.lrb-probe-{dead.pid}-{host}-abc123']
    not_ours = [f'.model_last_x.pth.tmp{os.getpid()}-{host}.pth', '.model_last_x.pth.tmpXYZ.pth',
                f'.model_last_x.pth.tmp{dead.pid}-{OTHER_HOST}.pth', f'.out.tmp-{dead.pid}-{OTHER_HOST}-abc',
                f'.model_last_x.pth.tmp{dead.pid}-{host}.json', 'model_last_x.pth.tmp1.pth', '.hidden']
    for name in ours_dead + not_ours:
        (tmp_path / name).write_text('x')
    (tmp_path / f'.out.tmp-{dead.pid}-{host}-k2j3h4').mkdir()          # a killed atomic_output_dir
    (tmp_path / f'.gone.old-{dead.pid}-{host}').mkdir()                # killed between its two renames
    (tmp_path / f'.gone.old-{dead.pid}-{host}' / 'data.txt').write_text('previous output')
    removed = files.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(ours_dead + [f'.out.tmp-{dead.pid}-{host}-k2j3h4'])
    assert sorted(os.listdir(tmp_path)) == sorted(not_ours + ['gone'])
    assert (tmp_path / 'gone' / 'data.txt').read_text() == 'previous output'  # put back, not deleted


# ------------------------------------------------------------------------------------------------
# 8. Ctrl-C


@pytest.mark.parametrize('when', ['after_a_checkpoint', 'before_any_checkpoint'])
def test_ctrl_c_is_one_line_naming_the_last_checkpoint(demo_root, small_bert_dir, tmp_path, when):
    out = tmp_path / 'out'
    proc = popen_train(train_args(demo_root, small_bert_dir, out, '--workers', 2, epochs=5))
    reader = LineReader(proc)
    try:
        reader.wait_for('saved ' if when == 'after_a_checkpoint' else 'parameters optimized')
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = reader.text()
    assert proc.returncode == 130 and 'Traceback' not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    if when == 'after_a_checkpoint':
        ck = out / 'model_last_demo.pth'
        epoch = torch.load(ck, weights_only=True)['epoch']
        assert last == (f'train.py: interrupted; the last checkpoint is {ck} (epoch {epoch}); '
                        f'continue with --resume {ck}')
    else:
        assert last == f'train.py: interrupted before the first checkpoint; nothing to resume in {out}'


def test_sigterm_is_the_same_line_and_exit_143(tmp_path):
    """A job scheduler's time limit (SLURM sends SIGTERM first): the line naming the checkpoint, no traceback."""
    script = tmp_path / 'job.py'
    script.write_text(
        'import sys, time\n'
        f'sys.path.insert(0, {str(REPO)!r})\n'
        'import utils\n'
        'def main(argv):\n'
        "    utils.record_checkpoint('/runs/model_last_x.pth', epoch=7)\n"
        "    print('ready', flush=True)\n"
        '    time.sleep(120)\n'
        'utils.run_cli(main)\n')
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'ready'
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and 'Traceback' not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == ('job.py: terminated (SIGTERM); the last checkpoint is /runs/model_last_x.pth '
                                               '(epoch 7); continue with --resume /runs/model_last_x.pth')


# ------------------------------------------------------------------------------------------------
# the checks themselves


def test_compressed_rle_total_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 200, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        counts = mask_utils.encode(np.asfortranarray(m))['counts']
        assert check.compressed_rle_total(counts) == h * w
        assert check.compressed_rle_total(counts.decode()) == h * w
    for bad in ('O', 'PPPP', 'abc~', 'é'):
        assert check.compressed_rle_total(bad) is None


@pytest.mark.parametrize('segmentation, problem', [
    ([[1, 1, 9, 1, 9, 9]], None),
    ([[1.5, 1, 9, 1, 9, 9], [0, 0, 3, 0, 3, 3, 0, 3]], None),
    ({'size': [20, 30], 'counts': [600]}, None),
    ([], 'empty list of polygons'),
    ([[1, 1, 9, 1, 9]], 'odd number of coordinates'),
    ([[1, 1, 9, float('nan'), 9, 9]], 'holds nan'),
    ([[1, 1, 9, True, 9, 9]], 'holds a bool'),
    ([7], 'polygon 0 is an int'),
    ({'size': [20, 30]}, "RLE has no 'counts'"),
    ({'size': [20], 'counts': 'abc'}, 'is not [height, width]'),
    ({'size': [20, 30], 'counts': [599, -1, 2]}, 'non-negative integers'),
    ({'size': [20, 30], 'counts': 3.5}, 'is a float, not a list or a string'),
    ('text', "'segmentation' is a str, not polygons or RLE"),
    (None, "'segmentation' is missing"),
])
def test_segmentation_problem(segmentation, problem):
    found = check.segmentation_problem(segmentation, 20, 30)
    assert (found is None) if problem is None else (problem in found), found


def test_check_split_data_runs_in_parallel_and_reports_all_problems(rrsisd_refs_root, tmp_path):
    """The real 17,402 refs (synthesized annotations) through the process pool: every mask passes; then
    three broken ones are all counted and the first one is named."""
    from refer.refer import REFER
    refer = REFER(str(rrsisd_refs_root), 'rrsisd', 'unc')
    refs = list(refer.Refs.values())
    assert check.check_masks(refs, refer.Anns, refer.Imgs, refer.instances_file, workers=2) == (17402, 0)
    for ann_id in (refs[5000]['ann_id'], refs[9000]['ann_id'], refs[17000]['ann_id']):
        refer.Anns[ann_id]['segmentation'] = [[0, 0, 1, 1]]
    with pytest.raises(utils.InputError, match=rf"annotation {refs[5000]['ann_id']} .*\(and 2 more problems"):
        check.check_masks(refs, refer.Anns, refer.Imgs, refer.instances_file, workers=2)
