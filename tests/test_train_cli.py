"""train.py and test.py through their real command lines, on the demo data with the nano model and the
small BERT (CPU): one epoch then testing its checkpoint, 2-process torchrun (gloo) evaluation equal to
one process, exact resume, original-style checkpoints, and the one-line input errors."""
import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests import script_server

REPO = Path(__file__).resolve().parents[1]


def common_args(demo_root, small_bert_dir):
    return ['--device', 'cpu', '--dataset', 'rrsisd', '--refer_data_root', str(demo_root),
            '--swin_type', 'nano', '--img_size', '64', '--workers', '0', '--pretrained_swin_weights', '',
            '--bert_tokenizer', str(small_bert_dir), '--ck_bert', str(small_bert_dir)]


def run(script, args, nproc=1, check=True, env_extra=None):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--standalone']
    cmd += [str(REPO / script)] + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **(env_extra or {}))
    proc = script_server.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
                             f'{proc.stderr[-5000:]}')
    return proc


def train_args(demo_root, small_bert_dir, out, epochs, *extra):
    return common_args(demo_root, small_bert_dir) + [str(a) for a in (
        '--epochs', epochs, '--batch-size', 4, '--output-dir', out, '--model_id', 'demo', '--print-freq', 2,
        '--seed', 7, *extra)]


def load_script(name):
    """Import an entry point by path (a plain `import test` could find the standard library's)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'_script_{name[:-3]}', REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_metrics(path):
    with open(path) as f:
        return json.load(f)


METRIC_KEYS = ['oIoU', 'mIoU', 'precision@0.5', 'precision@0.6', 'precision@0.7', 'precision@0.8',
               'precision@0.9', 'num_sentences', 'cum_I', 'cum_U']


@pytest.fixture(scope='module')
def trained(demo_root, small_bert_dir, tmp_path_factory):
    """One epoch of train.py (--model lavt, separate BERT)."""
    out = tmp_path_factory.mktemp('train1')
    proc = run('train.py', train_args(demo_root, small_bert_dir, out, 1))
    return out, proc


def test_one_epoch_writes_checkpoints_and_logs(trained):
    out, proc = trained
    names = sorted(os.listdir(out))
    assert 'model_last_demo.pth' in names and 'model_best_demo.pth' in names and 'tb_demo' in names
    assert not [n for n in names if 'tmp' in n]
    ck = torch.load(out / 'model_last_demo.pth', map_location='cpu', weights_only=True)
    assert {'model', 'bert_model', 'optimizer', 'lr_scheduler', 'epoch', 'args'} <= set(ck)
    assert ck['epoch'] == 0 and ck['args']['swin_type'] == 'nano'
    assert len(ck['optimizer']['param_groups']) == 4
    assert 'overall IoU' in proc.stderr + proc.stdout and 'Epoch: [0] [2/' in proc.stderr
    assert os.listdir(out / 'tb_demo')


@pytest.fixture(scope='module')
def tested(trained, demo_root, small_bert_dir, tmp_path_factory):
    """test.py (one process) on the trained checkpoint, with overlays."""
    out, _ = trained
    vis = tmp_path_factory.mktemp('vis')
    proc = run('test.py', common_args(demo_root, small_bert_dir) + [
        '--resume', out / 'model_last_demo.pth', '--split', 'test', '--vis_dir', vis, '--vis_num', 3])
    return read_metrics(out / 'model_last_demo_rrsisd_test_metrics.json'), proc, vis


def test_test_py_on_trained_checkpoint_with_overlays(tested):
    metrics, proc, vis = tested
    assert 'overall IoU = ' in proc.stdout and 'precision@0.9 = ' in proc.stdout
    assert metrics['split'] == 'test' and metrics['num_sentences'] == 8  # 40 demo images -> 8 test refs
    assert 0 <= metrics['oIoU'] <= 100
    assert sorted(os.listdir(vis)) == ['00000_s0.png', '00001_s0.png', '00002_s0.png']


def test_torchrun_two_process_eval_equals_one_process(trained, tested, demo_root, small_bert_dir, tmp_path):
    out, _ = trained
    proc = run('test.py', common_args(demo_root, small_bert_dir) + [
        '--resume', out / 'model_last_demo.pth', '--split', 'test', '--results_json', tmp_path / 'two.json'],
        nproc=2)
    one, two = tested[0], read_metrics(tmp_path / 'two.json')
    assert two['processes'] == 2 and one['processes'] == 1
    assert {k: one[k] for k in METRIC_KEYS} == {k: two[k] for k in METRIC_KEYS}
    assert proc.stdout.count('overall IoU') == 1  # printed by rank 0 only


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(demo_root, small_bert_dir, tmp_path, one_thread):
    # train.py's main with real argument lists, in this process (spares three interpreter start-ups)
    train_script = load_script('train.py')
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    lr = ('--lr', '1e-3')  # large steps, so any difference in data order, augmentation or dropout shows
    train_script.main(train_args(demo_root, small_bert_dir, whole, 2, *lr))
    train_script.main(train_args(demo_root, small_bert_dir, parts, 2, *lr, '--stop_after', 1))
    assert torch.load(parts / 'model_last_demo.pth', weights_only=True)['epoch'] == 0
    train_script.main(train_args(demo_root, small_bert_dir, parts, 2, *lr, '--resume', parts / 'model_last_demo.pth'))
    a = torch.load(whole / 'model_last_demo.pth', weights_only=True)
    b = torch.load(parts / 'model_last_demo.pth', weights_only=True)
    assert a['epoch'] == b['epoch'] == 1 and a['best_oiou'] == b['best_oiou']
    for key in ('model', 'bert_model'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.allclose(a[key][k].float(), b[key][k].float(), atol=1e-6, rtol=0), f'{key}.{k}'
    assert a['lr_scheduler']['last_epoch'] == b['lr_scheduler']['last_epoch']


def test_original_style_checkpoints_load(trained, demo_root, small_bert_dir, tmp_path, one_thread):
    """The reference saves its DDP-wrapped BERT (`module.` keys) and args as a Namespace; stage 3
    saves 'student_model'. All give the same metrics as our own file."""
    out, _ = trained
    ours = torch.load(out / 'model_last_demo.pth', weights_only=True)
    original = {'model': ours['model'],
                'bert_model': {f'module.{k}': v for k, v in ours['bert_model'].items()},
                'optimizer': ours['optimizer'], 'lr_scheduler': ours['lr_scheduler'], 'epoch': 0,
                'args': argparse.Namespace(**ours['args'])}
    torch.save(original, tmp_path / 'original.pth')
    stage3 = {'student_model': {f'module.{k}': v for k, v in ours['model'].items()},
              'bert_model': ours['bert_model'], 'epoch': 0}
    torch.save(stage3, tmp_path / 'stage3.pth')
    test_script = load_script('test.py')
    base = common_args(demo_root, small_bert_dir) + ['--split', 'val']
    results = []
    for name, ck in [('ours', out / 'model_last_demo.pth'), ('original', tmp_path / 'original.pth'),
                     ('stage3', tmp_path / 'stage3.pth')]:
        test_script.main(base + ['--resume', str(ck), '--results_json', str(tmp_path / f'{name}.json')])
        results.append(read_metrics(tmp_path / f'{name}.json'))
    assert results[2]['weights_key'] == 'student_model'
    assert [{k: r[k] for k in METRIC_KEYS} for r in results[1:]] == [{k: results[0][k] for k in METRIC_KEYS}] * 2


def test_input_errors_are_one_line(trained, demo_root, small_bert_dir, tmp_path, one_thread):
    from utils import InputError
    test_script, train_script = load_script('test.py'), load_script('train.py')

    out, _ = trained
    ckpt = out / 'model_last_demo.pth'
    base = common_args(demo_root, small_bert_dir)
    with pytest.raises(InputError, match='--resume .*missing.pth: file not found'):
        test_script.main(base + ['--resume', str(tmp_path / 'missing.pth')])
    with pytest.raises(InputError, match="split 'nosuch' has no refs"):
        test_script.main(base + ['--resume', str(ckpt), '--split', 'nosuch'])
    with pytest.raises(InputError, match=r"'model' does not fit this architecture: .*key '.*' has shape"):
        test_script.main(base + ['--resume', str(ckpt), '--swin_type', 'tiny'])
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match='--device cuda: no CUDA GPU is available'):
            train_script.main(train_args(demo_root, small_bert_dir, tmp_path, 1) + ['--device', 'cuda'])
    with pytest.raises(InputError, match='--resume .*: file not found'):
        train_script.main(train_args(demo_root, small_bert_dir, tmp_path, 1, '--resume', str(tmp_path / 'x.pth')))
    # what a user sees: `prog: error: message` on one line, exit status 2
    proc = run('train.py', train_args(demo_root, small_bert_dir, tmp_path, 1, '--batch-size', 3), check=False,
               env_extra={'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': '0'})
    assert proc.returncode == 2
    assert proc.stderr.strip() == 'train.py: error: --batch-size 3 is not divisible by the 2 processes'


def test_torchrun_two_process_training(demo_root, small_bert_dir, tmp_path):
    """DDP on gloo: the global batch of 4 is split 2 + 2; validation is sharded and reduced."""
    out = tmp_path / 'ddp'
    proc = run('train.py', train_args(demo_root, small_bert_dir, out, 1), nproc=2)
    assert '2 process(es) on cpu; batch 2 per process' in proc.stderr
    ck = torch.load(out / 'model_last_demo.pth', weights_only=True)
    assert ck['epoch'] == 0 and len(ck['rng']) == 2  # both ranks' RNG, for an exact resume
    assert not any(k.startswith('module.') for k in ck['model']) and not any(
        k.startswith('module.') for k in ck['bert_model'])


def test_lavt_one_train_and_test(demo_root, small_bert_dir, tmp_path, one_thread):
    """BERT inside the model: its first 10 layers are the 4th parameter group; test.py loads the result."""
    train_script, test_script = load_script('train.py'), load_script('test.py')
    out = tmp_path / 'one'
    train_script.main(train_args(demo_root, small_bert_dir, out, 1, '--model', 'lavt_one'))
    ck = torch.load(out / 'model_last_demo.pth', weights_only=True)
    assert 'bert_model' not in ck and any(k.startswith('text_encoder.encoder.layer.9.') for k in ck['model'])
    n_bert_layer_tensors = len([k for k in ck['model'] if k.startswith('text_encoder.encoder.layer.')])
    assert len(ck['optimizer']['param_groups'][3]['params']) == n_bert_layer_tensors
    summary = test_script.main(common_args(demo_root, small_bert_dir) + [
        '--model', 'lavt_one', '--resume', str(out / 'model_last_demo.pth'), '--split', 'val'])
    assert summary['num_sentences'] == 4
