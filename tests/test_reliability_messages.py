"""Reliability round 2 (issue 20), messages: bad model ids, --extra_args that do not split, unreadable
weight / bank files and directories given as files, stage checkpoints missing a key. Each through the
real command line: one line `prog: error: ...`, non-zero exit, no traceback, nothing trained.

The processes of a test run side by side (`run_all`): most of their time is Python and torch starting.
"""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from test_reliability import REPO, assert_no_training, assert_one_line_error, model_args, train_args

import utils  # the repository is on sys.path through test_reliability
from tests import script_server
from utils import InputError


def run_all(*commands, timeout=300):
    """Run the (script, args) pairs at once -> their CompletedProcess-like results, in order."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    procs = [script_server.popen([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script, args in commands]
    results = []
    for proc, (script, args) in zip(procs, commands):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess([script, *args], proc.returncode, out, err))
    return results


# ------------------------------------------------------------------------------------------------
# a model id is a plain file-name component


BAD_IDS = ['x/../../escaped', '']  # through train.py; the rule itself on more below, in-process


@pytest.mark.parametrize('bad', ['..', '.', '.hidden', 'a\\b', 'a\x00b', 'tab\tid', 'x' * 201])
def test_model_id_rule(bad):
    with pytest.raises(InputError, match='--model_id .*: must be a plain file name'):
        utils.check_flag_values(argparse.Namespace(model_id=bad), ())
    utils.check_flag_values(argparse.Namespace(model_id='RMSIN_10-pct v2'), ())


def test_model_id_that_is_not_a_file_name_is_one_line_in_every_script(demo_root, small_bert_dir, tmp_path):
    stage1 = tmp_path / 'stage1.pth'
    torch.save({'model': {}, 'bert_model': {}}, stage1)
    commands = []
    for i, bad in enumerate(BAD_IDS):
        out = tmp_path / f'out{i}'
        commands.append(('train.py', train_args(demo_root, small_bert_dir, out) + ['--model_id', bad]))
    stage = train_args(demo_root, small_bert_dir, tmp_path / 'stage', '--model', 'lavt', '--resume', stage1)
    commands += [('train_stu_base.py', stage + ['--model_id', BAD_IDS[0]]),
                 ('train_stu_tea.py', stage + ['--model_id', BAD_IDS[0]]),
                 ('test.py', model_args(demo_root, small_bert_dir) + ['--resume', stage1, '--model_id', BAD_IDS[0],
                                                                      '--results_json', tmp_path / 'm.json'])]
    for (script, args), proc in zip(commands, run_all(*commands)):
        bad = args[-1] if script != 'test.py' else BAD_IDS[0]
        line = assert_one_line_error(proc, '--model_id', 'a plain file name', script=script)
        assert repr(bad) in line or bad in line, line
        assert proc.returncode == 2
        assert_no_training(proc)
    assert not list(tmp_path.glob('escaped*')) and not list(tmp_path.glob('out*/*'))  # nothing written


# ------------------------------------------------------------------------------------------------
# reproduce.py --extra_args / --torchrun_args that shlex cannot split


def test_unbalanced_quote_in_extra_args_is_one_line(demo_root, tmp_path):
    base = ['--refer_data_root', demo_root, '--output_dir', tmp_path / 'pipe', '--device', 'cpu']
    extra, torchrun = run_all(('reproduce.py', base + ['--extra_args', "--mha '4-4-4-4"]),
                              ('reproduce.py', base + ['--torchrun_args', '--rdzv "x']))
    assert_one_line_error(extra, '--extra_args', 'No closing quotation', script='reproduce.py')
    assert_one_line_error(torchrun, '--torchrun_args', 'No closing quotation', script='reproduce.py')
    assert extra.returncode == torchrun.returncode == 2


# ------------------------------------------------------------------------------------------------
# weights and banks that are not torch files, directories given as files


def test_weights_and_banks_that_are_not_torch_files_or_are_directories(demo_root, small_bert_dir, tmp_path):
    noise = tmp_path / 'noise.pth'
    noise.write_bytes(os.urandom(4096))
    folder = tmp_path / 'folder.pth'
    folder.mkdir()
    stage1 = tmp_path / 'stage1.pth'
    torch.save({'model': {}, 'bert_model': {}}, stage1)

    def stage3(i, bank):
        return train_args(demo_root, small_bert_dir, tmp_path / f's3_{i}', '--model', 'lavt', '--resume', stage1,
                          '--caption_embedding_path', bank)

    def swin(i, weights):
        args = train_args(demo_root, small_bert_dir, tmp_path / f's1_{i}')
        args[args.index('--pretrained_swin_weights') + 1] = weights
        return args

    cases = [
        (('train.py', swin(0, noise)), ['--pretrained_swin_weights', str(noise), 'not a torch checkpoint']),
        (('train_stu_tea.py', stage3(0, noise)), ['--caption_embedding_path', str(noise), 'not a torch checkpoint']),
        (('train_stu_tea.py', stage3(1, folder)),
         ['--caption_embedding_path', str(folder), 'is a directory, not a file']),
        (('mask_train_only.py', ['--refer_data_root', demo_root, '--output_dir', tmp_path / 'm0',
                                 '--instances', folder]), ['--instances', str(folder), 'is a directory, not a file']),
        (('mask_train_only.py', ['--refer_data_root', demo_root, '--output_dir', tmp_path / 'm1', '--refs', folder]),
         ['--refs', str(folder), 'is a directory, not a file']),
    ]
    for ((script, _), needles), proc in zip(cases, run_all(*[c for c, _ in cases])):
        line = assert_one_line_error(proc, *needles, script=script)
        assert 'weights_only' not in line and 'will likely succeed' not in line, line
        assert_no_training(proc)


# ------------------------------------------------------------------------------------------------
# a stage checkpoint missing a key the stage scripts read: one line, before any model is built


STAGE3_KEYS = ('student_model', 'bert_model', 'teacher_model', 'caption_bank', 'optimizer', 'lr_scheduler',
               'bank_optimizer', 'bank_lr_scheduler', 'epoch')
STAGE2_KEYS = ('model', 'bert_model', 'caption_bank', 'optimizer', 'lr_scheduler', 'epoch')


@pytest.mark.parametrize('script, stage, keys, missing', [
    ('train_stu_tea.py', 3, STAGE3_KEYS, 'teacher_model'),
    ('train_stu_tea.py', 3, STAGE3_KEYS, 'bank_optimizer'),
    ('train_stu_base.py', 2, STAGE2_KEYS, 'caption_bank'),
    ('train_stu_tea.py', None, ('model', 'bert_model'), 'bert_model'),  # a stage-1 teacher without its BERT
])
def test_stage_checkpoint_missing_a_key_is_one_line_up_front(demo_root, small_bert_dir, tmp_path, script, stage,
                                                             keys, missing):
    ck = {k: {} for k in keys if k != missing}
    if stage:
        ck['lrb_stage'] = stage
    path = tmp_path / 'ck.pth'
    torch.save(ck, path)
    bank = tmp_path / 'bank.pt'
    torch.save({'embedding': torch.zeros(1, 20, 32), 'sample_id_to_index': {0: 0}}, bank)
    args = train_args(demo_root, small_bert_dir, tmp_path / 'out', '--model', 'lavt', '--resume', path,
                      '--caption_embedding_path', bank)
    (proc,) = run_all((script, args))
    assert_one_line_error(proc, str(path), f"'{missing}'", script=script)
    assert proc.returncode == 2
    assert 'refs' not in proc.stderr.replace(str(demo_root), '')  # refused before the data is built


def test_pretrained_swin_weights_that_is_a_directory(demo_root, small_bert_dir, tmp_path):
    folder = tmp_path / 'folder.pth'
    folder.mkdir()
    args = train_args(demo_root, small_bert_dir, tmp_path / 'out')
    args[args.index('--pretrained_swin_weights') + 1] = folder
    (proc,) = run_all(('train.py', args))
    assert_one_line_error(proc, '--pretrained_swin_weights', str(folder), 'is a directory, not a file',
                          script='train.py')
