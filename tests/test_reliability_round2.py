"""Reliability round 2 (issue 20), the rest, through the real command lines on the demo data (nano Swin, 64 px,
one epoch, --workers 0): images in any mode decoded to the right 8-bit RGB by every reader (or refused by the
data check), non-finite weights / banks / losses refused in one line, train refs with an empty mask or a blank
expression refused by the data check, and a TensorBoard folder that turns unwritable mid-run as one clean line.

Faults that need a precise instant come from a `sitecustomize` on the child's PYTHONPATH (as in
test_reliability_kills.py); the fault itself is real (a NaN in the loss, the log folder replaced by a file,
which no write gets past, root or not)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tests'))

import test_predict  # noqa: E402
from lib import inference  # noqa: E402
from refer.dataset import ReferDataset  # noqa: E402
from test_reliability import ann_of, assert_one_line_error, first, make_root, model_args, train_args  # noqa: E402
from test_reliability_messages import run_all  # noqa: E402
from tests import script_server  # noqa: E402

nano = test_predict.nano  # a module fixture: a random nano RMSIN + small BERT saved as train.py saves it
pytestmark = pytest.mark.usefixtures('one_thread_per_module')


def run_hooked(tmp_path, *commands, timeout=300):
    """Run the (script, args, sitecustomize source or None) triples at once -> CompletedProcess-like results."""
    procs = []
    for k, (script, args, hook) in enumerate(commands):
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
        if hook:
            folder = tmp_path / f'hook{k}'
            folder.mkdir()
            (folder / 'sitecustomize.py').write_text(f'import sys\nsys.path.insert(0, {str(REPO)!r})\n{hook}')
            env['PYTHONPATH'] = str(folder)
        procs.append(script_server.popen([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc, (script, args, _) in zip(procs, commands):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess([script, *args], proc.returncode, out, err))
    return results


# ------------------------------------------------------------------------------------------------
# 1. images in any mode: 8-bit RGB in every reader, or refused by the data check naming the file


def dataset_reader(path):
    """refer.dataset's reader (ReferDataset.load_image) on one file."""
    return ReferDataset.load_image(SimpleNamespace(refer=SimpleNamespace(image_path=lambda ref: str(path))),
                                   {'ref_id': 0})


def test_images_in_any_mode_decode_to_8bit_rgb_in_every_reader(nano, demo_root, small_bert_dir, tmp_path):
    source = demo_root / 'images' / 'rrsisd' / 'JPEGImages' / '00001.jpg'
    rgb = np.asarray(Image.open(source).convert('RGB'))  # [H, W, 3]
    grey = np.asarray(Image.fromarray(rgb).convert('L'))
    files = {'grey8.png': Image.fromarray(grey), 'grey16.png': Image.fromarray(grey.astype(np.uint16) * 257),
             'greyI.tif': Image.fromarray(grey.astype(np.int32) * 257, 'I')}
    for mode, ext in (('P', 'png'), ('LA', 'png'), ('CMYK', 'jpg'), ('1', 'png'), ('L', 'png')):
        files[f'{mode}.{ext}'] = Image.fromarray(rgb).convert(mode)
    alpha = np.where(np.arange(rgb.shape[1]) < rgb.shape[1] // 2, 0, 255).astype(np.uint8)  # left half transparent
    files['RGBA.png'] = Image.fromarray(np.dstack([rgb, np.broadcast_to(alpha, grey.shape)]), 'RGBA')
    for name, image in files.items():
        image.save(tmp_path / name)
    assert Image.open(tmp_path / 'grey16.png').mode == 'I;16' and Image.open(tmp_path / 'greyI.tif').mode == 'I'
    for name in files:
        decoded = [np.asarray(read(tmp_path / name)) for read in (inference.open_image, dataset_reader)]
        assert all(d.dtype == np.uint8 and d.shape == rgb.shape for d in decoded), name
        assert np.array_equal(*decoded), name  # one decoding for training, testing and predict.py
        expected = {'grey16.png': grey, 'greyI.tif': grey, 'grey8.png': grey, 'L.png': grey, 'LA.png': grey,
                    'RGBA.png': rgb}.get(name)
        if expected is not None:
            assert abs(decoded[0].mean() - expected.mean()) <= 1, name  # 16-bit: not an all-white picture
    assert np.array_equal(np.asarray(inference.open_image(tmp_path / 'RGBA.png')), rgb)  # alpha not premultiplied

    # the command lines: predict.py sees the 16-bit PNG as its 8-bit twin; the data check refuses a mode
    # without an 8-bit rendering ('F', 32-bit float), naming the file
    ckpt, _, _ = nano
    out = tmp_path / 'pred'

    def float_train_image(refs, instances, image_dir):
        ref = first(refs, 'train')
        name = next(i['file_name'] for i in instances['images'] if i['id'] == ref['image_id'])
        (image_dir / name).unlink()
        Image.fromarray(grey.astype(np.float32)).save(image_dir / name, format='TIFF')
        float_train_image.path = image_dir / name

    root = make_root(demo_root, tmp_path / 'root', float_train_image, copy_images=True)
    predicted, refused = run_all(
        ('predict.py', ['--resume', ckpt, '--image', tmp_path / 'grey8.png', tmp_path / 'grey16.png', '--out', out,
                        '--device', 'cpu', '--expression', 'a tank']),
        ('train.py', train_args(demo_root, small_bert_dir, tmp_path / 'run', root=root)))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    masks = [np.asarray(Image.open(out / json.loads(line)['mask']))
             for line in (out / 'predictions.jsonl').read_text().splitlines()]
    assert len(masks) == 2 and np.array_equal(masks[0], masks[1])
    assert_one_line_error(refused, f"image file '{float_train_image.path}'", "mode 'F'", script='train.py')


# ------------------------------------------------------------------------------------------------
# 2. non-finite values: weights, Swin weights, banks refused at load; a non-finite loss stops the run


NAN_LOSS_HOOK = '''
from lib.training import engine
_train_one_epoch = engine.train_one_epoch


def train_one_epoch(step_fn, loader, optimizer, lr_scheduler, epoch, **kw):
    calls = iter(range(10 ** 9))

    def step(batch):  # epoch 1's third loss is NaN (and so, through the weights, every later one)
        loss = step_fn(batch)
        return loss * float('nan') if epoch == 1 and next(calls) == 2 else loss
    return _train_one_epoch(step, loader, optimizer, lr_scheduler, epoch, **kw)


engine.train_one_epoch = train_one_epoch
'''


def test_non_finite_weights_banks_and_losses_are_one_line(nano, demo_root, small_bert_dir, tmp_path):
    ckpt, model, _ = nano
    nan_ckpt = tmp_path / 'nan.pth'
    state = torch.load(ckpt, map_location='cpu', weights_only=False)
    for key in ('model', 'bert_model'):
        state[key] = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in state[key].items()}
    torch.save(state, nan_ckpt)
    first_key = next(k for k, v in state['model'].items() if v.is_floating_point())
    swin = tmp_path / 'swin_inf.pth'
    backbone = dict(model.backbone.state_dict())
    backbone['layers.0.blocks.0.mlp.fc1.weight'] = backbone['layers.0.blocks.0.mlp.fc1.weight'].clone()
    backbone['layers.0.blocks.0.mlp.fc1.weight'][0, 0] = math.inf
    torch.save({'model': backbone}, swin)
    bank, stage1 = tmp_path / 'bank.pt', tmp_path / 'stage1.pth'
    torch.save({'embedding': torch.full((1, 20, 32), math.nan), 'sample_id_to_index': {0: 0}}, bank)
    torch.save({'model': {}, 'bert_model': {}}, stage1)

    swin_args = train_args(demo_root, small_bert_dir, tmp_path / 'swin')
    swin_args[swin_args.index('--pretrained_swin_weights') + 1] = swin
    out = tmp_path / 'diverged'
    tested, swin_run, bank_run, diverged = run_hooked(
        tmp_path,
        ('test.py', model_args(demo_root, small_bert_dir) + ['--resume', nan_ckpt, '--results_json',
                                                            tmp_path / 'm.json'], None),
        ('train.py', swin_args, None),
        ('train_stu_tea.py', train_args(demo_root, small_bert_dir, tmp_path / 's3', '--model', 'lavt', '--resume',
                                        stage1, '--caption_embedding_path', bank), None),
        ('train.py', train_args(demo_root, small_bert_dir, out, epochs=2), NAN_LOSS_HOOK))
    assert_one_line_error(tested, f'--resume {nan_ckpt}: non-finite values', f"['model']['{first_key}']",
                          script='test.py')
    assert 'overall IoU' not in tested.stdout + tested.stderr and not (tmp_path / 'm.json').exists()
    assert_one_line_error(swin_run, f'--pretrained_swin_weights {swin}: non-finite values',
                          "['model']['layers.0.blocks.0.mlp.fc1.weight']", script='train.py')
    assert_one_line_error(bank_run, f'--caption_embedding_path {bank}: non-finite values', "['embedding']",
                          script='train_stu_tea.py')

    assert_one_line_error(diverged, 'loss is not finite (nan) at epoch 1, iteration 3/7', script='train.py')
    last = torch.load(out / 'model_last_demo.pth', map_location='cpu', weights_only=False)
    assert last['epoch'] == 0 and all(torch.isfinite(v).all() for v in last['model'].values()
                                      if v.is_floating_point())  # epoch 0's, not overwritten by epoch 1


# ------------------------------------------------------------------------------------------------
# 3. the data check: train refs with an empty mask or a blank expression


def test_train_refs_with_empty_masks_or_blank_expressions_are_refused(demo_root, small_bert_dir, tmp_path):
    moved = []

    def polygons_outside(refs, instances, image_dir):
        for ref in [r for r in refs if r['split'] == 'train'][:2] + [first(refs, 'val')]:  # val: not an error
            ann = ann_of(instances, ref)
            ann['segmentation'] = [[v + (1000 if k % 2 == 0 else 0) for k, v in enumerate(p)]
                                   for p in ann['segmentation']]
            moved.append(ref)

    def blank_expression(refs, instances, image_dir):
        ref = [r for r in refs if r['split'] == 'train'][3]
        for sent in ref['sentences']:
            sent['raw'] = '   '
        moved.append(ref)

    roots = [make_root(demo_root, tmp_path / name, edit) for name, edit in
             (('outside', polygons_outside), ('blank', blank_expression))]
    outside, blank = run_all(*[('train.py', train_args(demo_root, small_bert_dir, tmp_path / f'run{k}', root=root))
                               for k, root in enumerate(roots)])
    assert_one_line_error(outside, f"instances file '{roots[0] / 'rrsisd' / 'instances.json'}'",
                          '2 train ref(s) with an empty mask', f"e.g. ref {moved[0]['ref_id']} ", script='train.py')
    assert_one_line_error(blank, f"refs file '{roots[1] / 'rrsisd' / 'refs(unc).p'}'",
                          "1 train ref(s) with an empty expression", f"e.g. ref {moved[3]['ref_id']} ",
                          script='train.py')
    assert 'Epoch: [' not in outside.stderr + blank.stderr


# ------------------------------------------------------------------------------------------------
# 4. TensorBoard's folder turns unwritable mid-run


TENSORBOARD_HOOK = '''
import os, shutil
from torch.utils.tensorboard import SummaryWriter
_add_scalar, _calls = SummaryWriter.add_scalar, []


def add_scalar(self, *args, **kwargs):  # after the first step's scalars, the log folder becomes a file
    out = _add_scalar(self, *args, **kwargs)
    _calls.append(1)
    if len(_calls) == 2:
        self.flush()
        shutil.rmtree(self.log_dir)
        open(self.log_dir, 'w').close()
    return out


SummaryWriter.add_scalar = add_scalar
'''


def test_tensorboard_folder_unwritable_mid_run_is_one_clean_line(demo_root, small_bert_dir, tmp_path):
    out = tmp_path / 'out'
    (proc,) = run_hooked(tmp_path, ('train.py', train_args(demo_root, small_bert_dir, out), TENSORBOARD_HOOK))
    line = assert_one_line_error(proc, f"cannot write '{out / 'tb_demo'}': Not a directory",
                                 f"('{out / 'tb_demo'}/events.out.tfevents.", script='train.py')
    assert "b'" not in line and 'Exception in thread' not in proc.stderr
    assert 'Epoch: [0] [2/7]' in proc.stderr  # it failed mid-run, not at the start


# ------------------------------------------------------------------------------------------------
# 5. the probe's flag values (in-process; the command-line path of check_flag_values is tested elsewhere)


@pytest.mark.parametrize('flag, bad', [('seed', 2 ** 70), ('seed', 2 ** 32), ('seed', -1),  # torch: an overflow
                                       ('epochs', 10 ** 12)])  # stage 3 planned 10**12 epochs of bank steps
def test_seed_and_epochs_out_of_range(flag, bad):
    import argparse
    import utils
    with pytest.raises(utils.InputError, match=rf'^--{flag} {bad}: must be '):
        utils.check_flag_values(argparse.Namespace(**{flag: bad}), (flag,))
    utils.check_flag_values(argparse.Namespace(seed=2 ** 32 - 1, epochs=utils.MAX_EPOCHS), ('seed', 'epochs'))


def test_mask_train_only_refuses_refs_without_a_train_split(demo_root, tmp_path):
    """It wrote 5 ratios of splits with no train refs at all (exit 0)."""
    import utils

    def drop_train(refs, instances, image_dir):
        refs[:] = [r for r in refs if r['split'] != 'train']

    root = make_root(demo_root, tmp_path / 'root', drop_train)
    with pytest.raises(utils.InputError, match=r"refs\(unc\)\.p': no train refs \(split 'train'\)"):
        test_predict.load_script('mask_train_only.py').main(['--refer_data_root', str(root), '--output_dir',
                                                             str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()


def test_predictions_that_overflow_are_refused_not_scored():
    """Weights that are finite but huge (a checkpoint x 1e38) give inf/NaN logits: evaluation (test.py, the
    validation of every training) says so in one line instead of reporting oIoU 0."""
    from lib.training.engine import evaluate
    from utils import InputError
    batch = {'input_ids': torch.ones(2, 1, 4, dtype=torch.long),
             'attention_mask': torch.ones(2, 1, 4, dtype=torch.long), 'target': torch.zeros(2, 8, 8, dtype=torch.long), 'ref_id': torch.tensor([3, 4])}

    def overflowing(sub):
        logits = torch.zeros(2, 2, 8, 8)
        logits[1, 0, 0, 0] = float('inf')
        return logits

    with pytest.raises(InputError, match=r"^the model's predictions are not finite \(NaN or inf\) for 1 of 2 "
                                         r"sentences: its weights overflow"):
        evaluate(overflowing, [batch], torch.device('cpu'))
    assert evaluate(lambda sub: torch.zeros(2, 2, 8, 8), [batch], torch.device('cpu')) is not None
