"""predict.py (and lib/inference.py) on a nano model with random weights (nothing is trained): a checkpoint
saved as train.py saves it, the real command line on two images of different sizes and aspect ratios with two
expressions, masks equal to test.py's forward (dataset transform + predict_fn) brought back to each image's
size, every checkpoint kind, --threshold, and the one-line input errors."""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import utils
from lib import inference
from lib.model.build import build_model
from lib.training.checkpoint import args_to_dict, save_checkpoint
from lib.training.engine import predict_fn
from tests import script_server

REPO = Path(__file__).resolve().parents[1]
SHORT = 'the storage tank at the top left'
# more than 20 tokens: cut as in training, with a warning
LONG = ('the small white vehicle parked on the road at the bottom right next to the large grey building '
        'beside the green field')
EXPRESSIONS = [SHORT, LONG]
SIZES = {'wide.png': (96, 72), 'tall.jpg': (50, 130)}  # (width, height)
MARGIN = 1e-5  # batched and one-by-one forwards agree to ~1e-7 in the logits, not bit for bit


def load_script(name):
    """Import an entry point by path (a plain `import test` could find the standard library's)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'_script_{name[:-3]}', REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_args(small_bert_dir, *extra):
    return utils.get_parser().parse_args(
        ['--swin_type', 'nano', '--img_size', '64', '--pretrained_swin_weights', '', '--device', 'cpu',
         '--ck_bert', str(small_bert_dir), '--bert_tokenizer', str(small_bert_dir), *extra])


@pytest.fixture(scope='module')
def nano(small_bert_dir, tmp_path_factory):
    """A random nano RMSIN + small BERT, saved as train.py does (save_checkpoint, args as a dict)."""
    args = model_args(small_bert_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, bert = build_model(args)
    model.eval()
    bert.eval()
    path = tmp_path_factory.mktemp('nano') / 'model_best_nano.pth'
    save_checkpoint({'model': model.state_dict(), 'bert_model': bert.state_dict(), 'epoch': 0,
                            'args': args_to_dict(args)}, path)
    return path, model, bert


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """A wide RGB PNG and a tall greyscale JPEG, with some structure."""
    folder = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    paths = []
    for name, (w, h) in SIZES.items():
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], -1).astype(np.uint8)
        pixels[h // 5:h // 2, w // 6:w // 2] = (230, 230, 220)  # a bright block at the top left
        pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        if name.endswith('.jpg'):
            image = image.convert('L')
        image.save(folder / name)
        paths.append(folder / name)
    return paths


def run_predict(args, check=True):
    cmd = [sys.executable, str(REPO / 'predict.py')] + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = script_server.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc


@pytest.fixture(scope='module')
def predicted(nano, images, tmp_path_factory):
    """The real command line with only what the checkpoint cannot know: the model flags come from its args."""
    ckpt, _, _ = nano
    out = tmp_path_factory.mktemp('pred') / 'out'
    args = ['--resume', ckpt, '--image', *images, '--out', out, '--device', 'cpu']
    for text in EXPRESSIONS:
        args += ['--expression', text]
    proc = run_predict(args)
    return out, proc


def reference_logits(model, bert, small_bert_dir, path, expression, img_size=64):
    """test.py's forward for one (image, expression): the dataset's transform and tokenization, then
    predict_fn -> logits [2, S, S]."""
    from bert.encoder import load_tokenizer
    from refer.dataset import tokenize_sentences
    from refer.transforms import build_transform
    image = Image.open(path).convert('RGB')
    tensor, _ = build_transform(img_size)(image, Image.new('L', image.size))
    ids, mask = tokenize_sentences(load_tokenizer(small_bert_dir), [expression], 20)
    with torch.no_grad():
        return predict_fn(model, bert)({'image': tensor[None], 'input_ids': ids,
                                               'attention_mask': mask})[0].float()


def to_size(x, w, h):
    return F.interpolate(x[None, None].float(), size=(h, w), mode='nearest-exact')[0, 0]


def read_mask(path):
    pixels = np.array(Image.open(path))
    assert pixels.dtype == np.uint8 and set(np.unique(pixels)) <= {0, 255}
    return pixels > 0


def read_records(out):
    with open(out / 'predictions.jsonl') as f:
        return [json.loads(line) for line in f]


def test_cli_writes_masks_overlays_and_json_lines(predicted, images):
    out, proc = predicted
    stems = ['wide', 'tall']
    expected = {'predictions.jsonl'} | {f'{s}_e{j}_{kind}.png' for s in stems for j in range(2)
                                        for kind in ('mask', 'overlay')}
    assert set(os.listdir(out)) == expected
    records = read_records(out)
    # stdout holds exactly the JSON lines, image-major
    assert [json.loads(line) for line in proc.stdout.splitlines()] == records
    assert [(Path(r['image']).name, r['expression']) for r in records] == [
        (p.name, e) for p in images for e in EXPRESSIONS]
    for r in records:
        assert set(r) == {'image', 'expression', 'mask', 'overlay', 'width', 'height', 'area', 'bbox',
                          'mean_probability', 'tokens', 'truncated'}
        w, h = SIZES[Path(r['image']).name]
        assert (r['width'], r['height']) == (w, h)
        mask = read_mask(out / r['mask'])
        assert mask.shape == (h, w)  # the image's own size, not the model's 64 x 64
        assert r['area'] == int(mask.sum())
        if r['area']:
            ys, xs = np.nonzero(mask)
            assert r['bbox'] == [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                 int(ys.max() - ys.min() + 1)]
            assert 0.5 <= r['mean_probability'] <= 1.0  # argmax: every mask pixel has p >= 0.5
        else:
            assert r['bbox'] is None and r['mean_probability'] is None
        overlay = np.array(Image.open(out / r['overlay']).convert('RGB'))
        scale = -(-256 // max(w, h))  # small images are enlarged to 256 px for reading
        assert overlay.shape[1] == w * scale and overlay.shape[0] > h * scale  # the text band below
        band = overlay[h * scale:]
        assert (band.sum(-1) < 200).any()  # the expression is written there
        assert r['truncated'] == (r['expression'] == LONG) and (r['tokens'] > 20) == r['truncated']
    assert 0 < sum(r['area'] for r in records) < sum(r['width'] * r['height'] for r in records)
    # which value came from where, on one line; the model flags came from the checkpoint's args
    line = [ln for ln in proc.stderr.splitlines() if 'model flags ' in ln]
    assert len(line) == 1
    assert "from the checkpoint: model='lavt', swin_type='nano', img_size=64" in line[0]
    assert "from the command line: device='cpu'" in line[0]
    assert '--expression 2 has ' in proc.stderr and 'cut to 20 as in training' in proc.stderr


def test_masks_equal_test_py_forward(predicted, nano, images, small_bert_dir, one_thread):
    """Same pixels at the model's resolution: the mask is test.py's argmax at 64 x 64, resized (nearest,
    pixel centres) to the image's size; the mean probability is over the same pixels."""
    out, _ = predicted
    _, model, bert = nano
    for r in read_records(out):
        w, h = r['width'], r['height']
        logits = reference_logits(model, bert, small_bert_dir, r['image'], r['expression'])
        ref_mask = to_size(logits.argmax(0), w, h).bool().numpy()
        margin = to_size((logits[1] - logits[0]).abs(), w, h).numpy()
        mask = read_mask(out / r['mask'])
        sure = margin > MARGIN
        assert sure.mean() > 0.99
        assert np.array_equal(mask[sure], ref_mask[sure]), r['mask']
        if r['area']:
            prob = to_size(logits.softmax(0)[1], w, h).numpy()
            assert r['mean_probability'] == pytest.approx(float(prob[mask].mean()), abs=1e-5)


def test_every_checkpoint_kind_gives_the_same_masks(predicted, nano, images, small_bert_dir, tmp_path, one_thread):
    """The original's layout (DDP `module.` BERT keys, args as a Namespace) and stage 3's 'student_model'
    with `module.` keys and no stored args (flags given on the command line) give the same masks."""
    out, _ = predicted
    ckpt, _, _ = nano
    ours = torch.load(ckpt, map_location='cpu', weights_only=True)
    original = {'model': ours['model'], 'bert_model': {f'module.{k}': v for k, v in ours['bert_model'].items()},
                'epoch': 0, 'args': argparse.Namespace(**ours['args'])}
    stage3 = {'student_model': {f'module.{k}': v for k, v in ours['model'].items()},
              'bert_model': ours['bert_model'], 'epoch': 0}
    torch.save(original, tmp_path / 'original.pth')
    torch.save(stage3, tmp_path / 'stage3.pth')
    predict = load_script('predict.py')
    flags = ['--swin_type', 'nano', '--img_size', '64', '--ck_bert', small_bert_dir, '--bert_tokenizer', small_bert_dir]
    for name, extra in (('original', []), ('stage3', flags)):
        dst = tmp_path / name
        records = predict.main([str(a) for a in ['--resume', tmp_path / f'{name}.pth', '--image', *images,
                                                 '--expression', SHORT, '--out', dst, '--device', 'cpu', *extra]])
        assert len(records) == 2
        for r in records:
            assert np.array_equal(read_mask(dst / r['mask']), read_mask(out / r['mask'])), (name, r['mask'])


def test_threshold(predicted, nano, images, small_bert_dir, tmp_path, one_thread):
    _, model, bert = nano
    predict = load_script('predict.py')
    logits = reference_logits(model, bert, small_bert_dir, images[0], SHORT)
    prob = logits.softmax(0)[1]
    t = float(prob.median())  # about half the pixels
    base = ['--resume', nano[0], '--image', images[0], '--expression', SHORT, '--device', 'cpu']
    (r,) = predict.main([str(a) for a in base + ['--out', tmp_path / 'a', '--threshold', t]])
    w, h = SIZES[images[0].name]
    ref = to_size(prob > t, w, h).bool().numpy()
    close = to_size((prob - t).abs() < 1e-6, w, h).bool().numpy()
    mask = read_mask(tmp_path / 'a' / r['mask'])
    assert np.array_equal(mask[~close], ref[~close]) and 0 < r['area'] < w * h
    (r,) = predict.main([str(a) for a in base + ['--out', tmp_path / 'b', '--threshold', 0.999]])
    assert r['area'] == 0 and r['bbox'] is None and r['mean_probability'] is None
    assert not read_mask(tmp_path / 'b' / r['mask']).any()


def test_input_errors_are_one_line(predicted, nano, images, small_bert_dir, tmp_path, one_thread):
    from utils import InputError
    out, _ = predicted
    predict = load_script('predict.py')
    ckpt = nano[0]
    base = ['--resume', str(ckpt), '--device', 'cpu']

    def main(*extra):
        return predict.main(base + [str(a) for a in extra])

    fresh = tmp_path / 'fresh'
    not_an_image = tmp_path / 'notes.png'
    not_an_image.write_text('not a picture')
    with pytest.raises(InputError, match='--image .*missing.png: file not found'):
        main('--image', images[0], tmp_path / 'missing.png', '--expression', SHORT, '--out', fresh)
    with pytest.raises(InputError, match='--image .*notes.png: not an image file'):
        main('--image', not_an_image, '--expression', SHORT, '--out', fresh)
    with pytest.raises(InputError, match='--expression 2 of 2: empty'):
        main('--image', images[0], '--expression', SHORT, '--expression', '  ', '--out', fresh)
    with pytest.raises(InputError, match='--threshold 1.5: must be in'):
        main('--image', images[0], '--expression', SHORT, '--out', fresh, '--threshold', 1.5)
    with pytest.raises(InputError, match=r"'model' does not fit this architecture: .*key '.*' has shape"):
        main('--image', images[0], '--expression', SHORT, '--out', fresh, '--swin_type', 'tiny')
    with pytest.raises(InputError, match='--out .*: is not empty'):
        main('--image', images[0], '--expression', SHORT, '--out', out)
    with pytest.raises(InputError, match='--resume .*nothing.pth: file not found'):
        predict.main(['--resume', str(tmp_path / 'nothing.pth'), '--image', str(images[0]), '--expression', SHORT,
                      '--out', str(fresh)])
    # BERT paths stored by the training machine that do not exist here: the error says where they came from
    ours = torch.load(ckpt, map_location='cpu', weights_only=True)
    ours['args'] = dict(ours['args'], ck_bert=str(tmp_path / 'gone'), bert_tokenizer=str(tmp_path / 'gone'))
    torch.save(ours, tmp_path / 'moved.pth')
    with pytest.raises(InputError, match="cannot load BERT .*came from the checkpoint's stored args; pass --ck_bert"):
        predict.main(['--resume', str(tmp_path / 'moved.pth'), '--image', str(images[0]), '--expression', SHORT,
                      '--out', str(fresh), '--device', 'cpu'])
    assert not fresh.exists()  # nothing is left behind by a failed run
    # --overwrite replaces the folder as a whole
    again = tmp_path / 'again'
    again.mkdir()
    (again / 'old.txt').write_text('old')
    main('--image', images[1], '--expression', SHORT, '--out', again, '--overwrite')
    assert sorted(os.listdir(again)) == ['predictions.jsonl', 'tall_e0_mask.png', 'tall_e0_overlay.png']
    # what a user sees: `prog: error: message` on one line, exit status 2
    proc = run_predict(base + ['--image', tmp_path / 'missing.png', '--expression', SHORT, '--out', fresh],
                       check=False)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.strip() == f'predict.py: error: --image {tmp_path / "missing.png"}: file not found'


def test_stored_args_window12_from_the_swin_file_name():
    """As at training time, window 12 follows from the Swin weights' file name when --window12 was not set."""
    stored = inference.stored_model_flags({'args': argparse.Namespace(
        swin_type='base', window12=False, img_size=480, device='cuda:0',
        pretrained_swin_weights='pretrained_weights/swin_base_patch4_window12_384_22k.pth')})
    assert stored == {'swin_type': 'base', 'window12': True, 'img_size': 480}
    assert inference.stored_model_flags({'model': {}}) == {}
