"""The LRB stages through their real command lines on the demo data (nano Swin, small BERT, CPU):
train.py on the no-mask root -> train_stu_base.py on the mask root -> train_stu_tea.py on the all root ->
test.py on the stage-3 checkpoint; what each stage may change; exact resume; 2-process runs keep one bank;
counted bank steps equal those taken; the one-line input errors."""
import os

import pytest
import torch

from lib.model.build import build_model, checkpoint_window_size
from lib.training.checkpoint import load_model_and_bert
from lib.training.lrb.bank import ReferenceBank
from test_train_cli import common_args, load_script, read_metrics, run

EPS = 1e-6


@pytest.fixture(scope='module')
def splits(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('splits') / 'splits'
    load_script('mask_train_only.py').main(['--refer_data_root', str(demo_root), '--dataset', 'rrsisd',
                                            '--output_dir', str(out), '--ratios', '90'])
    return {view: out / f'rrsisd-90-{view}' for view in ('all', 'no-mask', 'mask')}


def stage_args(root, small_bert_dir, out, epochs, *extra):
    return common_args(root, small_bert_dir) + [str(a) for a in (
        '--epochs', epochs, '--batch-size', 4, '--output-dir', out, '--model_id', 'lrb', '--print-freq', 2,
        '--seed', 3, *extra)]


@pytest.fixture(scope='module')
def pipeline(splits, small_bert_dir, tmp_path_factory):
    """The whole method through its command lines, one epoch per stage."""
    base = tmp_path_factory.mktemp('pipeline')
    s1, s2, s3 = base / 'stage1', base / 'stage2', base / 'stage3'
    run('train.py', stage_args(splits['no-mask'], small_bert_dir, s1, 1, '--lr', '1e-3'))
    stage2 = run('train_stu_base.py', stage_args(splits['mask'], small_bert_dir, s2, 1, '--lr', '1e-2',
                                                 '--resume', s1 / 'model_last_lrb.pth'))
    stage3 = run('train_stu_tea.py', stage_args(
        splits['all'], small_bert_dir, s3, 1, '--lr', '1e-3', '--caption_lr', '1e-2', '--resume',
        s1 / 'model_last_lrb.pth', '--caption_embedding_path', s2 / 'caption_embeddings_lrb.pt'))
    test = run('test.py', common_args(splits['all'], small_bert_dir) + [
        '--resume', s3 / 'model_best_oIoU_lrb.pth', '--split', 'test', '--results_json', base / 'test.json'])
    return {'s1': s1, 's2': s2, 's3': s3, 'logs': {2: stage2.stderr, 3: stage3.stderr, 'test': test.stdout},
            'test': read_metrics(base / 'test.json')}


def is_bn_buffer(key):
    return 'running_' in key or 'num_batches_tracked' in key


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_pipeline_files_and_test_py(pipeline):
    assert sorted(n for n in os.listdir(pipeline['s2']) if not n.startswith('tb_')) == [
        'caption_embeddings_lrb.pt', 'model_last_lrb.pth']
    assert sorted(n for n in os.listdir(pipeline['s3']) if not n.startswith('tb_')) == [
        'caption_embeddings_lrb_mIoU_best.pt', 'caption_embeddings_lrb_oIoU_best.pt', 'model_best_mIoU_lrb.pth',
        'model_best_oIoU_lrb.pth', 'model_last_lrb.pth']
    last = load(pipeline['s3'] / 'model_last_lrb.pth')
    assert {'student_model', 'teacher_model', 'bert_model', 'caption_bank', 'optimizer', 'lr_scheduler',
            'bank_optimizer', 'bank_lr_scheduler', 'epoch', 'args'} <= set(last)
    assert pipeline['test']['weights_key'] == 'student_model' and pipeline['test']['num_sentences'] == 8
    assert 'overall IoU' in pipeline['logs']['test']


def test_stage2_bank_covers_the_mask_roots_train_refs(pipeline, splits, small_bert_dir):
    from bert.encoder import load_tokenizer
    from refer.dataset import ReferDataset
    from refer.refer import REFER
    train = ReferDataset(REFER(str(splits['mask']), 'rrsisd', 'unc'), 'train', load_tokenizer(str(small_bert_dir)),
                         64, eval_mode=True)
    bank = load(pipeline['s2'] / 'caption_embeddings_lrb.pt')
    assert list(bank['sample_id_to_index']) == train.ref_ids and bool(train.is_weak.all())
    assert bank['embedding'].shape == (len(train.ref_ids), 20, 32)  # 32 = the small BERT's width


def test_stage2_changes_only_the_bank(pipeline):
    """Every RMSIN and BERT parameter is bit-identical after stage 2; BatchNorm statistics move (RMSIN runs
    in train mode, as the original)."""
    before, after = load(pipeline['s1'] / 'model_last_lrb.pth'), load(pipeline['s2'] / 'model_last_lrb.pth')
    moved = []
    for key in ('model', 'bert_model'):
        assert before[key].keys() == after[key].keys()
        for k, v in before[key].items():
            if is_bn_buffer(k):
                moved.append(not torch.equal(v, after[key][k]))
            else:
                assert torch.equal(v, after[key][k]), f'{key}.{k}'
    assert any(moved)
    bank = after['caption_bank']['embedding']
    assert 0.015 < bank.std() < 0.05 and after['optimizer']['state'][0]['step'] > 0


def test_stage3_teacher_is_the_ema_of_the_student(pipeline):
    ck = load(pipeline['s3'] / 'model_last_lrb.pth')
    s1 = load(pipeline['s1'] / 'model_last_lrb.pth')['model']
    changed = [k for k in s1 if not is_bn_buffer(k) and not torch.equal(ck['student_model'][k], s1[k])]
    assert changed  # the student learned
    for k in changed:  # the teacher moved, but only part of the way (EMA); its buffers stay as loaded
        assert not torch.equal(ck['teacher_model'][k], ck['student_model'][k]), k
        assert not torch.equal(ck['teacher_model'][k], s1[k]), k
    for k in s1:
        if is_bn_buffer(k):
            assert torch.equal(ck['teacher_model'][k], s1[k]), k


def test_stage3_logs_bank_steps(pipeline):
    assert '0 bank steps' not in pipeline['logs'][3]
    assert 'bank steps taken in this run; schedule at' in pipeline['logs'][3]


# --- counted bank steps = steps taken ------------------------------------------------------------------------

def brute_force_bank_steps(root, batch_size, seed, epochs, update_every, inner_steps, weak_ids):
    """Walk the real loader's batches (indices only) and count where the original would step."""
    from torch.utils.data import DataLoader, DistributedSampler
    from refer.refer import REFER
    ref_ids = REFER(str(root), 'rrsisd', 'unc').getRefIds(split='train')
    sampler = DistributedSampler(range(len(ref_ids)), num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = DataLoader(range(len(ref_ids)), batch_size=batch_size, sampler=sampler, drop_last=True)
    total = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i % update_every == 0 and any(ref_ids[j] in weak_ids for j in batch.tolist()):
                total += inner_steps
    return total


@pytest.mark.parametrize('update_every,inner_steps', [(1, 1), (2, 2), (3, 1), (1, 2), (2, 1), (3, 2)])
def test_counted_bank_steps_equal_steps_taken(pipeline, splits, small_bert_dir, tmp_path, one_thread,
                                              update_every, inner_steps):
    stage3 = load_script('train_stu_tea.py')
    bank_file = pipeline['s2'] / 'caption_embeddings_lrb.pt'
    stage3.main(stage_args(splits['all'], small_bert_dir, tmp_path, 1, '--caption_update_every', update_every,
                           '--caption_inner_steps', inner_steps, '--resume', pipeline['s1'] / 'model_last_lrb.pth',
                           '--caption_embedding_path', bank_file))
    taken = load(tmp_path / 'model_last_lrb.pth')['bank_lr_scheduler']['last_epoch']
    weak = set(load(bank_file)['sample_id_to_index'])
    expected = brute_force_bank_steps(splits['all'], 4, 3, 1, update_every, inner_steps, weak)
    assert taken == expected > 0


# --- resume ------------------------------------------------------------------------------------------------

def assert_close_dicts(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=EPS, rtol=0), f'{what}.{k}'


def test_stage2_resume_equals_uninterrupted(pipeline, splits, small_bert_dir, tmp_path, one_thread):
    stage2 = load_script('train_stu_base.py')
    teacher = pipeline['s1'] / 'model_last_lrb.pth'
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    args = lambda out, *extra: stage_args(splits['mask'], small_bert_dir, out, 2, '--lr', '1e-2', *extra)
    stage2.main(args(whole, '--resume', teacher))
    stage2.main(args(parts, '--resume', teacher, '--stop_after', 1))
    assert load(parts / 'model_last_lrb.pth')['epoch'] == 0
    stage2.main(args(parts, '--resume', parts / 'model_last_lrb.pth'))
    a, b = load(whole / 'model_last_lrb.pth'), load(parts / 'model_last_lrb.pth')
    assert a['epoch'] == b['epoch'] == 1 and a['best_oiou'] == b['best_oiou']
    assert torch.allclose(a['caption_bank']['embedding'], b['caption_bank']['embedding'], atol=EPS, rtol=0)
    assert_close_dicts(a['model'], b['model'], 'model')
    assert torch.equal(load(whole / 'caption_embeddings_lrb.pt')['embedding'],
                       load(parts / 'caption_embeddings_lrb.pt')['embedding'])


def test_stage2_with_a_compiled_teacher_learns_the_same_bank(pipeline, splits, small_bert_dir, tmp_path):
    out = tmp_path / 'compiled'
    run('train_stu_base.py', stage_args(splits['mask'], small_bert_dir, out, 1, '--lr', '1e-2', '--resume',
                                        pipeline['s1'] / 'model_last_lrb.pth', '--compile', 'aot_eager'))
    eager, compiled = load(pipeline['s2'] / 'model_last_lrb.pth'), load(out / 'model_last_lrb.pth')
    assert torch.allclose(compiled['caption_bank']['embedding'], eager['caption_bank']['embedding'], atol=1e-4, rtol=0)
    assert_close_dicts({k: v for k, v in compiled['model'].items() if is_bn_buffer(k)},
                       {k: v for k, v in eager['model'].items() if is_bn_buffer(k)}, 'BatchNorm statistics')


def test_stage3_resume_equals_uninterrupted(pipeline, splits, small_bert_dir, tmp_path, one_thread):
    stage3 = load_script('train_stu_tea.py')
    start = ('--resume', pipeline['s1'] / 'model_last_lrb.pth',
             '--caption_embedding_path', pipeline['s2'] / 'caption_embeddings_lrb.pt')
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    args = lambda out, *extra: stage_args(splits['all'], small_bert_dir, out, 2, '--lr', '1e-3',
                                          '--caption_lr', '1e-2', '--caption_update_every', 2, *extra)
    stage3.main(args(whole, *start))
    stage3.main(args(parts, *start, '--stop_after', 1))
    stage3.main(args(parts, '--resume', parts / 'model_last_lrb.pth'))  # no bank path: it is in the checkpoint
    a, b = load(whole / 'model_last_lrb.pth'), load(parts / 'model_last_lrb.pth')
    assert a['epoch'] == b['epoch'] == 1
    for key in ('student_model', 'teacher_model', 'bert_model'):
        assert_close_dicts(a[key], b[key], key)
    assert torch.allclose(a['caption_bank']['embedding'], b['caption_bank']['embedding'], atol=EPS, rtol=0)
    assert a['bank_lr_scheduler']['last_epoch'] == b['bank_lr_scheduler']['last_epoch'] > 0


# --- several processes ---------------------------------------------------------------------------------------

def test_two_processes_keep_one_bank(pipeline, splits, small_bert_dir, tmp_path):
    """gloo, 2 processes: the bank's gradient is averaged at every bank step, so both hold the same bank
    (each run checks it across processes at every epoch start and at the end, and fails otherwise)."""
    s2 = run('train_stu_base.py', stage_args(splits['mask'], small_bert_dir, tmp_path / 's2', 2, '--lr', '1e-2',
                                             '--resume', pipeline['s1'] / 'model_last_lrb.pth'), nproc=2)
    assert s2.stderr.count('reference bank identical on all 2 processes') == 3
    s3 = run('train_stu_tea.py', stage_args(
        splits['all'], small_bert_dir, tmp_path / 's3', 1, '--caption_lr', '1e-2',
        '--resume', pipeline['s1'] / 'model_last_lrb.pth',
        '--caption_embedding_path', tmp_path / 's2' / 'caption_embeddings_lrb.pt'), nproc=2)
    assert s3.stderr.count('reference bank identical on all 2 processes') == 2
    ck = load(tmp_path / 's3' / 'model_last_lrb.pth')
    assert ck['bank_lr_scheduler']['last_epoch'] > 0 and len(ck['rng']) == 2


# --- input errors ---------------------------------------------------------------------------------------------

def test_input_errors_are_one_line(pipeline, splits, small_bert_dir, tmp_path, one_thread):
    from utils import InputError
    stage2, stage3 = load_script('train_stu_base.py'), load_script('train_stu_tea.py')
    s1 = pipeline['s1'] / 'model_last_lrb.pth'
    bank_file = pipeline['s2'] / 'caption_embeddings_lrb.pt'
    all_args = lambda *extra: stage_args(splits['all'], small_bert_dir, tmp_path / 'out', 1, *extra)

    partial = load(bank_file)
    dropped = next(iter(partial['sample_id_to_index']))
    del partial['sample_id_to_index'][dropped]
    torch.save(partial, tmp_path / 'partial.pt')
    with pytest.raises(InputError, match=rf'no rows for 1 of the \d+ weak train refs of the data root \(e.g. ref '
                       rf'{dropped}\)'):
        stage3.main(all_args('--resume', s1, '--caption_embedding_path', tmp_path / 'partial.pt'))
    ReferenceBank(partial['sample_id_to_index'].keys() | {dropped}, dim=8).save(tmp_path / 'narrow.pt')
    with pytest.raises(InputError, match='bank width 8 differs from the BERT width 32'):
        stage3.main(all_args('--resume', s1, '--caption_embedding_path', tmp_path / 'narrow.pt'))
    with pytest.raises(InputError, match='--caption_embedding_path: give the stage-2 bank'):
        stage3.main(all_args('--resume', s1))
    for flag in ('--caption_inner_steps', '--caption_update_every'):
        with pytest.raises(InputError, match=f'{flag} 0: must be >= 1'):
            stage3.main(all_args('--resume', s1, '--caption_embedding_path', bank_file, flag, 0))
    with pytest.raises(InputError, match='no weak .*train refs.*mask data root'):
        stage2.main(stage_args(splits['no-mask'], small_bert_dir, tmp_path / 'out2', 1, '--resume', s1))
    torch.save({'epoch': 3}, tmp_path / 'nomodel.pth')
    torch.save({'model': load(s1)['model']}, tmp_path / 'nobert.pth')
    for script, root in ((stage2, splits['mask']), (stage3, splits['all'])):
        extra = ('--caption_embedding_path', bank_file)
        with pytest.raises(InputError, match="nomodel.pth: no 'model' entry"):
            script.main(stage_args(root, small_bert_dir, tmp_path / 'o', 1, '--resume', tmp_path / 'nomodel.pth',
                                   *extra))
        with pytest.raises(InputError, match="nobert.pth: no 'bert_model' entry"):
            script.main(stage_args(root, small_bert_dir, tmp_path / 'o', 1, '--resume', tmp_path / 'nobert.pth',
                                   *extra))
    # a finished stage is never replaced silently
    for script, root, out, extra in ((stage2, splits['mask'], pipeline['s2'], ()),
                                     (stage3, splits['all'], pipeline['s3'], ('--caption_embedding_path', bank_file))):
        with pytest.raises(InputError, match=r'holds .* of a finished run; pass --resume .*model_last_lrb.pth to '
                           r'continue it or --overwrite to replace it'):
            script.main(stage_args(root, small_bert_dir, out, 1, '--resume', s1, *extra))
    with pytest.raises(InputError, match='--resume: give the stage-1 checkpoint'):
        stage2.main(stage_args(splits['mask'], small_bert_dir, tmp_path / 'o', 1))
    with pytest.raises(InputError, match='--model lavt_one: .* need --model lavt'):
        stage2.main(stage_args(splits['mask'], small_bert_dir, tmp_path / 'o', 1, '--resume', s1,
                               '--model', 'lavt_one'))
    # what a user sees: one line, exit status 2
    proc = run('train_stu_tea.py', all_args('--resume', s1), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith('train_stu_tea.py: error: --caption_embedding_path')
    assert 'Traceback' not in proc.stderr


def test_window_size_follows_the_checkpoint(small_bert_dir, demo_root):
    """A window-12 stage-1 checkpoint (Swin weights *window12*.pth) loads in the stage scripts and test.py
    without --window12, as in the original, whose stage scripts took the window from the weights' name."""
    import argparse
    import utils
    args = utils.get_parser().parse_args(common_args(demo_root, small_bert_dir) + ['--window12'])
    model, _ = build_model(args, pretrained='')
    checkpoint = {'model': model.state_dict()}
    assert checkpoint_window_size(checkpoint) == 12
    plain = argparse.Namespace(**{**vars(args), 'window12': False})
    rebuilt, bert = build_model(plain, pretrained='', checkpoint=checkpoint)
    load_model_and_bert({'model': checkpoint['model'], 'bert_model': bert.state_dict()}, rebuilt, bert)
    window7, _ = build_model(plain, pretrained='')
    assert checkpoint_window_size({'model': window7.state_dict()}) == 7
