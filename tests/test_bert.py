"""Text encoder on transformers: the small BERT round-trips through save_pretrained/from_pretrained,
its vocabulary covers the expressions, and loading failures are one-line InputErrors."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bert.build_small import SPECIAL_TOKENS, build_small_bert, collect_expressions
from bert.encoder import encode, load_bert, load_text_config, load_tokenizer
from utils import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_small_bert_round_trip(small_bert_dir, tmp_path):
    tokenizer = load_tokenizer(small_bert_dir)
    model = load_bert(small_bert_dir).eval()
    config = load_text_config(small_bert_dir)
    assert model.pooler is None and config.hidden_size == 32 and config.num_hidden_layers == 10
    assert tokenizer.is_fast and tokenizer.pad_token_id == 0
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS

    batch = tokenizer(['The storage tank on the upper left', 'A vehicle'], padding='max_length', max_length=20,
                      return_tensors='pt')
    with torch.no_grad():
        features = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'])[0]
    assert features.shape == (2, 20, config.hidden_size)  # text width flows from the config

    model.save_pretrained(tmp_path / 'copy')
    tokenizer.save_pretrained(tmp_path / 'copy')
    reloaded = load_bert(tmp_path / 'copy').eval()
    assert load_tokenizer(tmp_path / 'copy')('A vehicle')['input_ids'] == tokenizer('A vehicle')['input_ids']
    with torch.no_grad():
        again = reloaded(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'])[0]
    torch.testing.assert_close(again, features, rtol=0, atol=0)


@pytest.mark.parametrize('implementation', ['sdpa', 'eager'])
def test_encode_gives_the_features_without_asking_the_device(monkeypatch, implementation):
    """encode() passes the padding mask prepared in 4-D: transformers' check whether any token is padded
    (a host synchronisation on a GPU) is not reached, and the features are BERT's own."""
    import transformers.masking_utils as masking
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, attn_implementation=implementation)
    bert = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1, 100, (3, 20))
    padded = (torch.arange(20) < torch.tensor([[5], [20], [9]])).long()
    unpadded = torch.ones_like(padded)
    embeds = torch.randn(3, 20, 32)
    with torch.no_grad():
        expected = [bert(ids, attention_mask=m)[0] for m in (padded, unpadded)]
        expected.append(bert(inputs_embeds=embeds, attention_mask=padded)[0])
        monkeypatch.setattr(masking, '_ignore_bidirectional_mask_sdpa', None)  # calling it would fail
        got = [encode(bert, m, input_ids=ids) for m in (padded, unpadded)]
        got.append(encode(bert, padded, inputs_embeds=embeds))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))
    assert not torch.equal(got[0], got[1])  # the mask is applied


def test_vocabulary_covers_the_expressions(small_bert_dir, demo_root):
    tokenizer = load_tokenizer(small_bert_dir)
    expressions = collect_expressions(demo_root, 'rrsisd', 'unc')
    assert 'Expressway-Service-area' in expressions  # category names are part of the corpus
    ids = tokenizer(expressions)['input_ids']
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert tokenizer.tokenize('The STORAGE tank') == tokenizer.tokenize('the storage tank')  # lowercasing


def test_build_small_is_seeded_and_refuses_existing_out(tmp_path):
    expressions = ['a vehicle on the left', 'the ship in the middle']
    build_small_bert(expressions, tmp_path / 'a', hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    build_small_bert(expressions, tmp_path / 'b', hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    a, b = load_bert(tmp_path / 'a').state_dict(), load_bert(tmp_path / 'b').state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match='not empty'):
        build_small_bert(expressions, tmp_path / 'a', hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    build_small_bert(expressions, tmp_path / 'a', hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     overwrite=True)
    assert load_text_config(tmp_path / 'a').num_hidden_layers == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a', 'b']  # no temp dirs left behind


def test_build_small_vocabulary_is_the_same_in_every_process(tmp_path):
    # the WordPiece trainer numbers its alphabet in (per-process) hash order; ids must not depend on it
    code = ('import sys; from bert.build_small import build_small_bert; from bert.encoder import load_tokenizer; '
            'build_small_bert(["a vehicle on the left", "the ship in the middle", "storagetank"], sys.argv[1], '
            'hidden_size=16, num_hidden_layers=1, num_attention_heads=2); '
            'print(sorted(load_tokenizer(sys.argv[1]).get_vocab().items(), key=lambda kv: kv[1]))')
    vocabs = [subprocess.run([sys.executable, '-c', code, str(tmp_path / name)], cwd=REPO_ROOT, check=True,
                             capture_output=True, text=True).stdout for name in ('a', 'b')]
    assert vocabs[0] == vocabs[1] and '##' in vocabs[0]


@pytest.mark.parametrize('loader', [load_tokenizer, load_bert, load_text_config])
def test_missing_local_dir(tmp_path, loader):
    with pytest.raises(InputError, match=r"cannot load BERT from '.*nowhere'.*download bert-base-uncased"):
        loader(tmp_path / 'nowhere')


@pytest.mark.parametrize('loader', [load_tokenizer, load_bert, load_text_config])
def test_directory_without_weights(tmp_path, loader):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(InputError, match="'.*empty': the directory lacks"):
        loader(tmp_path / 'empty')


def test_hub_name_offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant it consults
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(InputError, match="'bert-base-uncased-not-cached': not a local directory.*hub is unreachable"):
        load_tokenizer('bert-base-uncased-not-cached')
    with pytest.raises(InputError, match='--ck_bert'):
        load_bert('bert-base-uncased-not-cached')


def test_build_small_cli_refuses_missing_root(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'bert.build_small', '--refer_data_root', str(tmp_path / 'nowhere'),
                           '--dataset', 'rrsisd', '--out', str(tmp_path / 'bert')],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'nowhere' in lines[0] and '--refer_data_root' in lines[0], proc.stderr
