"""RMSIN model (lib/): shapes, gradients, factories, Swin weights, state_dict round trips, errors.

All on CPU with the `nano` preset; the Swin-B / 480-px interface is checked on the meta device
against a manifest of the reference model's state_dict (tests/data, generated from the reference).
"""
import json
from pathlib import Path

import pytest
import torch
from timm.layers import resize_rel_pos_bias_table_simple

import utils
from lib.model.backbone import SWIN_PRESETS, WindowAttention, shifted_window_mask
from lib.model.cross_scale import CIM, token_counts
from lib.model.decoder import AdaptiveRotatedConv2d, RoutingFunction, rotation_matrix_3x3
from lib.model.pretrained import load_reference_state_dict
from lib.model.segmentation import LAVT, LAVTOne, lavt, lavt_one

TEXT_DIM = 32
MANIFEST = Path(__file__).parent / 'data' / 'rmsin_base480_state_dict.json'


pytestmark = pytest.mark.usefixtures('one_thread_per_module')


def make_args(*extra, img_size=64):
    return utils.get_parser().parse_args(
        ['--swin_type', 'nano', '--img_size', str(img_size), '--pretrained_swin_weights', '', *extra])


def build(seed=0, *extra, img_size=64, pretrained=''):
    torch.manual_seed(seed)
    return lavt(pretrained, make_args(*extra, img_size=img_size), text_dim=TEXT_DIM)


def text(batch=2, n=20, words=7, dim=TEXT_DIM):
    l_feats = torch.randn(batch, dim, n)
    l_mask = torch.zeros(batch, n, 1)
    l_mask[:, :words] = 1
    return l_feats, l_mask


@pytest.fixture(scope='module')
def nano():
    return build()


@pytest.mark.parametrize('size', [(64, 64), (96, 96), (64, 96)])
def test_nano_shapes(nano, size):
    image = torch.randn(2, 3, *size)
    l_feats, l_mask = text()
    with torch.no_grad():
        feats = nano.backbone(image, l_feats, l_mask)
        logits = nano(image, l_feats, l_mask)
    H, W = size
    assert [tuple(f.shape) for f in feats] == [(2, 32 * 2 ** i, H // 4 // 2 ** i, W // 4 // 2 ** i) for i in range(4)]
    assert logits.shape == (2, 2, H, W)
    assert torch.isfinite(logits).all()


def test_gradients_reach_every_trainable_parameter():
    # float64: some weights' gradients are ~1e-13 here (a conv before a train-mode BatchNorm at 8 x 8), which
    # float32 can round to exactly 0
    model = build(1).double()
    model.train()
    image = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    l_feats, l_mask = text()
    model(image, l_feats.double(), l_mask.double()).logsumexp(1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    # weights only: a bias just before a train-mode BatchNorm has a gradient of exactly 0 in exact math
    zero = [n for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and not p.grad.abs().sum() > 0]
    assert zero == []
    # the only frozen weights: the last stage's gated sum, which feeds nothing in the reference either
    frozen = {n.split('.')[3] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {'res_gate', 'visual_residual', 'visual_gate'}
    assert all(n.startswith('backbone.layers.3.') for n, p in model.named_parameters() if not p.requires_grad)


def test_eval_is_deterministic_and_batch_independent(nano):
    nano.eval()
    image = torch.randn(3, 3, 64, 64)
    l_feats, l_mask = text(3)
    with torch.no_grad():
        full = nano(image, l_feats, l_mask)
        single = torch.cat([nano(image[i:i + 1], l_feats[i:i + 1], l_mask[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(full, single, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_strict_identical_outputs(nano):
    nano.eval()
    other = build(7)
    other.eval()
    # as saved from a DDP-wrapped model
    saved = {f'module.{k}': v.clone() for k, v in nano.state_dict().items()}
    result = load_reference_state_dict(other, saved)
    assert not result.missing_keys and not result.unexpected_keys
    image = torch.randn(2, 3, 64, 64)
    l_feats, l_mask = text()
    with torch.no_grad():
        assert torch.equal(nano(image, l_feats, l_mask), other(image, l_feats, l_mask))
    other.load_state_dict(nano.state_dict(), strict=True)


def test_state_dict_mismatch_is_a_clear_error(nano):
    sd = dict(nano.state_dict())
    sd.pop('classifier.conv1_1.weight')
    sd['backbone.extra.weight'] = torch.zeros(1)
    with pytest.raises(utils.InputError, match='1 missing .*1 unexpected'):
        load_reference_state_dict(build(2), sd)


def test_reference_state_dict_interface_base_480():
    """Swin-B, 480 px, window 12, 768-wide text: keys, shapes and order of the reference's state_dict."""
    manifest = json.loads(MANIFEST.read_text())['state_dict']
    args = utils.get_parser().parse_args(['--swin_type', 'base', '--img_size', '480', '--window12'])
    with torch.device('meta'):
        model = lavt('', args, text_dim=768)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == manifest
    proj = model.backbone.cim.block[0].csa1.m.attention.proj
    assert (proj.out_features, proj.in_features) == token_counts(15, 15) == (225, 314)


def test_text_width_is_a_constructor_argument():
    model = build(0)
    att = model.backbone.layers[0].fusion.image_lang_att
    assert att.f_key[0].in_channels == att.f_value[0].in_channels == TEXT_DIM


def test_non_multiple_of_32_image_fails_clearly(nano):
    l_feats, l_mask = text()
    with pytest.raises(utils.InputError, match='80x64 is not a multiple of 32'):
        nano(torch.randn(2, 3, 80, 64), l_feats, l_mask)
    with pytest.raises(utils.InputError, match='--img_size 100'):
        build(0, img_size=100)


def test_mismatched_text_width_fails_clearly(nano):
    l_feats, l_mask = text(dim=48)
    with pytest.raises(utils.InputError, match=f'text width {TEXT_DIM}.*48'):
        nano(torch.randn(2, 3, 64, 64), l_feats, l_mask)


def test_bad_flags_fail_clearly():
    with pytest.raises(utils.InputError, match='--swin_type'):
        lavt('', utils.get_parser().parse_args(['--swin_type', 'huge']), text_dim=TEXT_DIM)
    with pytest.raises(utils.InputError, match='--mha'):
        build(0, '--mha', '2-2')
    with pytest.raises(utils.InputError, match='--mha'):
        build(0, '--mha', '3-3-3-3')  # 3 heads do not divide width 32


def test_missing_pretrained_file_is_an_error(tmp_path):
    path = tmp_path / 'swin_base_patch4_window12_384_22k.pth'
    with pytest.raises(utils.InputError, match=f'{path}: file not found'):
        build(0, pretrained=str(path))


def _official_swin_file(path, source):
    """An official-format Swin checkpoint ({'model': ...}, classifier head, final norm, attn masks)."""
    sd = {k: v.clone() for k, v in source.backbone.state_dict().items()
          if k.startswith('patch_embed.') or '.blocks.' in k or '.downsample.' in k}
    sd['norm.weight'], sd['norm.bias'] = torch.ones(256), torch.zeros(256)
    sd['head.weight'], sd['head.bias'] = torch.zeros(10, 256), torch.zeros(10)
    sd['layers.0.blocks.1.attn_mask'] = torch.zeros(4, 49, 49)
    torch.save({'model': sd}, path)
    return sd


def test_official_swin_checkpoint_loads_with_window_change(tmp_path, capsys):
    source = build(3)  # window 7
    path = tmp_path / 'swin_nano_patch4_window7_224.pth'
    sd = _official_swin_file(path, source)
    model = build(4, '--window12', pretrained=str(path))
    out = capsys.readouterr().out
    backbone = model.backbone
    assert backbone.layers[0].blocks[0].attn.window_size == (12, 12)
    own = backbone.state_dict()
    key = 'layers.2.blocks.1.attn.relative_position_bias_table'
    assert sd[key].shape == (13 * 13, 4) and own[key].shape == (23 * 23, 4)
    torch.testing.assert_close(own[key], resize_rel_pos_bias_table_simple(sd[key], (12, 12), (23 * 23, 4)))
    for k in ('patch_embed.proj.weight', 'layers.1.blocks.0.attn.qkv.weight', 'layers.2.downsample.reduction.weight'):
        assert torch.equal(own[k], sd[k])
    assert 'resized 8 relative position tables' in out
    assert 'not in the file (randomly initialised)' in out and 'layers.*.fusion' in out
    assert 'ignored' in out and 'head.weight' in out
    l_feats, l_mask = text()
    assert model(torch.randn(2, 3, 64, 64), l_feats, l_mask).shape == (2, 2, 64, 64)


def test_window12_in_the_file_name_selects_window_12(tmp_path):
    source = build(3, '--window12')
    path = tmp_path / 'swin_nano_patch4_window12_384.pth'
    sd = _official_swin_file(path, source)
    model = build(5, pretrained=str(path))
    key = 'layers.0.blocks.0.attn.relative_position_bias_table'
    assert torch.equal(model.backbone.state_dict()[key], sd[key])


def test_unrelated_checkpoint_is_rejected(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save({'model': {'fc.weight': torch.zeros(2, 2)}}, path)
    with pytest.raises(utils.InputError, match='no tensor matches'):
        build(0, pretrained=str(path))
    path.write_bytes(b'not a checkpoint')
    with pytest.raises(utils.InputError, match='not a torch checkpoint'):
        build(0, pretrained=str(path))


def _tiny_bert_dir(tmp_path):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=TEXT_DIM, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / 'bert')
    return str(tmp_path / 'bert')


def test_lavt_reads_text_width_from_the_bert_config(tmp_path):
    pytest.importorskip('bert.encoder')
    args = make_args('--ck_bert', _tiny_bert_dir(tmp_path))
    model = lavt('', args)
    assert isinstance(model, LAVT) and model.backbone.text_dim == TEXT_DIM


def test_lavt_one_factory(tmp_path):
    pytest.importorskip('bert.encoder')
    args = make_args('--ck_bert', _tiny_bert_dir(tmp_path))
    torch.manual_seed(0)
    model = lavt_one('', args)
    assert isinstance(model, LAVTOne) and model.text_encoder.pooler is None
    assert model.backbone.text_dim == TEXT_DIM
    input_ids = torch.randint(1, 50, (2, 20))
    attention_mask = torch.zeros(2, 20, dtype=torch.long)
    attention_mask[:, :6] = 1
    logits = model(torch.randn(2, 3, 64, 64), input_ids, attention_mask)
    assert logits.shape == (2, 2, 64, 64)
    logits.mean().backward()
    assert model.text_encoder.encoder.layer[0].attention.self.query.weight.grad is not None
    with pytest.raises(utils.InputError, match=r'\[B, N\]'):
        model(torch.randn(2, 3, 64, 64), input_ids, attention_mask[:, :10])


def test_cross_scale_sizes_and_resampled_token_mixer():
    """Built for one grid, run at others; a state_dict saved at 64 px loads into a 96-px model."""
    assert token_counts(15, 15) == (225, 314) and token_counts(2, 2) == (4, 4 + 1 + 1)
    cim = CIM([32, 64, 128, 256], grid=(3, 3)).eval()
    for grid in ((3, 3), (2, 2), (4, 2)):
        feats = [torch.randn(1, 32 * 2 ** i, grid[0] * 8 // 2 ** i, grid[1] * 8 // 2 ** i) for i in range(4)]
        with torch.no_grad():
            assert [o.shape for o in cim(feats)] == [f.shape for f in feats]
    small, large = build(0, img_size=64), build(1, img_size=96)
    assert small.backbone.cim.block[0].csa1.m.attention.proj.weight.shape == (4, 6)
    assert large.backbone.cim.block[0].csa1.m.attention.proj.weight.shape == (9, 9 + 4 + 1)
    load_reference_state_dict(large, small.state_dict())
    l_feats, l_mask = text()
    with torch.no_grad():
        assert torch.isfinite(large.eval()(torch.randn(2, 3, 96, 96), l_feats, l_mask)).all()


def test_rotated_conv_zero_angle_is_the_plain_kernel_and_batching_is_per_sample():
    eye = torch.eye(9).expand(1, 1, 9, 9)
    assert torch.equal(rotation_matrix_3x3(torch.zeros(1, 1)), eye)
    torch.testing.assert_close(rotation_matrix_3x3(torch.full((1, 1), -1e-9)), eye)
    torch.manual_seed(0)
    conv = AdaptiveRotatedConv2d(8, 8, 3, padding=1, rounting_func=RoutingFunction(8, 1)).eval()
    with torch.no_grad():
        # sample i is dominated by channel i and the angle weights alternate in sign, so the four
        # samples get clearly different angles of both signs
        conv.rounting_func.fc_theta.weight.copy_(torch.tensor([[3., -3.] * 4]))
        x = torch.randn(4, 8, 10, 10) * 0.1
        x[torch.arange(4), torch.arange(4)] += 3.0
        batched = conv(x)
        single = torch.cat([conv(x[i:i + 1]) for i in range(4)])
        angles = conv.rounting_func(x)[1]
    assert angles.abs().min() > 1e-3 and (angles > 0).any() and (angles < 0).any()
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_shifted_window_attention_matches_the_explicit_formula():
    """softmax(q k^T * scale + relative bias + shift mask) v, per window, as Swin writes it."""
    torch.manual_seed(0)
    B, nW, heads, ws, C = 2, 4, 2, 7, 16
    attn = WindowAttention(C, (ws, ws), heads).eval()
    x = torch.randn(B * nW, ws * ws, C)
    mask = shifted_window_mask(14, 14, ws, ws // 2, 'cpu')  # [nW, N, N]
    assert mask.shape == (nW, ws * ws, ws * ws) and set(mask.unique().tolist()) == {0.0, -100.0}
    N = ws * ws
    qkv = attn.qkv(x).reshape(B * nW, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
    logits = (q @ k.transpose(-2, -1) + bias).view(B, nW, heads, N, N) + mask[None, :, None]
    expected = (logits.view(-1, heads, N, N).softmax(-1) @ v).transpose(1, 2).reshape(B * nW, N, C)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask), attn.proj(expected), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attn(x), attn.proj(((q @ k.transpose(-2, -1) + bias).softmax(-1) @ v)
                                                      .transpose(1, 2).reshape(B * nW, N, C)), rtol=1e-5, atol=1e-6)


def test_msda_cross_scale_option():
    pytest.importorskip('lib.model.cross_scale_msda')
    model = build(0, '--cross_scale', 'msda')
    assert type(model.backbone.cim).__name__ == 'MSDACrossScale'
    l_feats, l_mask = text()
    assert model(torch.randn(2, 3, 64, 64), l_feats, l_mask).shape == (2, 2, 64, 64)


def test_presets():
    assert SWIN_PRESETS['base'] == (128, (2, 2, 18, 2), (4, 8, 16, 32))
    assert SWIN_PRESETS['tiny'] == (96, (2, 2, 6, 2), (3, 6, 12, 24))
    assert SWIN_PRESETS['large'][0] == 192 and SWIN_PRESETS['small'][1] == (2, 2, 18, 2)
