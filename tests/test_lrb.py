"""lib/training/lrb on its own: the bank's fill against a per-sample loop, bank files (ours and the original's
format), the row-sparse gradient average against a dense all-reduce over 2 gloo processes, the EMA
schedule and update, the stage-3 inner loop's isolation, and the bank-step plan against the batches a
real DataLoader yields."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

from lib.training.losses import build_criterion
from lib.training.lrb.bank import ReferenceBank, build_bank_optimizer, sync_bank_grad_
from lib.training.lrb.schedule import bank_step_plan, count_bank_steps, ema_momentum, ema_update_
from lib.training.lrb.stages import Stage3Joint
from lib.training.optim import build_poly_scheduler
from stand_ins import TinyLavt, make_batch, opt_args, tiny_bert
from utils import InputError


def loop_fill(bank, ref_ids, embeds, mask):
    """The original's fill written as a plain loop: sample by sample, padding slot by slot."""
    embeds, mask = embeds.clone(), mask.clone()
    for b, ref_id in enumerate(ref_ids.tolist()):
        if ref_id not in bank.sample_id_to_index:
            continue
        row = bank.embedding[bank.sample_id_to_index[ref_id]]
        pads = [j for j in range(mask.shape[1]) if mask[b, j] == 0][:bank.n_prompt]
        for k, j in enumerate(pads):
            embeds[b, j] = row[k]
            mask[b, j] = 1
    return embeds, mask


def random_batch(g, b=9, length=20, dim=8, ids=range(100, 112)):
    lengths = torch.randint(0, length + 1, (b,), generator=g)
    lengths[0], lengths[1] = length, 0  # a row with no padding and a row that is all padding
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ref_ids = torch.tensor(list(ids))[torch.randint(len(ids), (b,), generator=g)]
    return ref_ids, torch.randn(b, length, dim, generator=g), mask


@pytest.mark.parametrize('n_prompt', [20, 5])
def test_fill_equals_per_sample_loop(n_prompt):
    g = torch.Generator().manual_seed(0)
    bank = ReferenceBank(range(100, 108), n_prompt=n_prompt, dim=8)  # ids 108..111 are accurate
    for _ in range(5):
        ref_ids, embeds, mask = random_batch(g)
        got_e, got_m = bank.fill(ref_ids, embeds, mask)
        want_e, want_m = loop_fill(bank, ref_ids, embeds, mask)
        assert torch.equal(got_e, want_e) and torch.equal(got_m, want_m)


def test_fill_changes_exactly_the_padding_slots_in_order():
    bank = ReferenceBank([7, 9], n_prompt=4, dim=3)
    embeds = torch.randn(3, 6, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    out, new_mask = bank.fill(torch.tensor([9, 5, 7]), embeds, mask)  # 5 is not in the bank
    row9, row7 = bank.embedding[1], bank.embedding[0]
    assert torch.equal(out[0, :2], embeds[0, :2]) and torch.equal(out[0, 2:6], row9[:4])
    assert new_mask[0].tolist() == [1] * 6
    assert torch.equal(out[1], embeds[1]) and torch.equal(new_mask[1], mask[1])  # accurate: untouched
    assert torch.equal(out[2, :3], embeds[2, :3]) and torch.equal(out[2, 3:], row7[:3])
    assert new_mask[2].tolist() == [1] * 6
    # gradient reaches exactly the rows and prompt slots used
    out.sum().backward()
    used = torch.zeros(2, 4)
    used[1, :4] = 1
    used[0, :3] = 1
    assert torch.equal(bank.embedding.grad.abs().sum(-1) > 0, used.bool())


def test_fill_detached_gives_no_gradient_to_the_bank():
    bank = ReferenceBank([1], n_prompt=2, dim=3)
    words = torch.randn(1, 4, 3, requires_grad=True)
    out, _ = bank.fill(torch.tensor([1]), words, torch.tensor([[1, 0, 0, 0]]), detach=True)
    out.sum().backward()
    assert bank.embedding.grad is None and words.grad is not None


def test_lookup_unknown_ids_and_empty_bank():
    bank = ReferenceBank([30, 10, 20], n_prompt=2, dim=2)
    assert bank.lookup(torch.tensor([20, 11, 30, 10, 5, 99])).tolist() == [2, -1, 0, 1, -1, -1]
    empty = ReferenceBank([], n_prompt=2, dim=2)
    embeds, mask = torch.randn(2, 3, 2), torch.tensor([[1, 0, 0], [1, 1, 0]])
    out, new_mask = empty.fill(torch.tensor([1, 2]), embeds, mask)
    assert torch.equal(out, embeds) and torch.equal(new_mask, mask)


def test_bank_init_and_duplicate_ids():
    torch.manual_seed(0)
    bank = ReferenceBank(range(2000), n_prompt=20, dim=16)
    assert bank.embedding.shape == (2000, 20, 16)
    assert abs(bank.embedding.std().item() - 0.02) < 1e-3 and abs(bank.embedding.mean().item()) < 1e-3
    with pytest.raises(InputError, match='duplicate'):
        ReferenceBank([1, 2, 1])


# --- files ---------------------------------------------------------------------------------------------

def test_bank_file_round_trip(tmp_path):
    bank = ReferenceBank([5, 3, 8], n_prompt=4, dim=6)
    path = tmp_path / 'caption_embeddings_x.pt'
    bank.save(path)
    assert not [p for p in os.listdir(tmp_path) if 'tmp' in p]
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {'embedding', 'sample_id_to_index'} and raw['sample_id_to_index'] == {5: 0, 3: 1, 8: 2}
    again = ReferenceBank.from_file(str(path))
    assert again.ref_ids == [5, 3, 8] and torch.equal(again.embedding, bank.embedding)


def test_original_format_file_loads_with_its_own_row_order(tmp_path):
    """The original writes torch.save({'embedding', 'sample_id_to_index'}); a map whose rows are not in key
    order is rebuilt as the original's stage 3 does (row i of the new bank = key i's saved row)."""
    emb = torch.randn(3, 20, 8)
    torch.save({'embedding': emb, 'sample_id_to_index': {11: 2, 12: 0, 13: 1}}, tmp_path / 'orig.pt')
    bank = ReferenceBank.from_file(str(tmp_path / 'orig.pt'))
    assert bank.ref_ids == [11, 12, 13]
    for i, saved_row in enumerate([2, 0, 1]):
        assert torch.equal(bank.embedding[i], emb[saved_row])
    ids = torch.tensor([12])
    words, mask = torch.zeros(1, 20, 8), torch.tensor([[1, 1] + [0] * 18])
    assert torch.equal(bank.fill(ids, words, mask)[0][0, 2:], emb[0, :18])


def test_bank_file_errors(tmp_path):
    with pytest.raises(InputError, match='--caption_embedding_path .*nope.pt: file not found'):
        ReferenceBank.from_file(str(tmp_path / 'nope.pt'))
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(InputError, match='not a torch checkpoint'):
        ReferenceBank.from_file(str(tmp_path / 'junk.pt'))
    torch.save({'model': {}}, tmp_path / 'model.pt')
    with pytest.raises(InputError, match="not a reference bank .*has: model"):
        ReferenceBank.from_file(str(tmp_path / 'model.pt'))
    torch.save({'embedding': torch.zeros(2, 3, 4), 'sample_id_to_index': {1: 0, 2: 5}}, tmp_path / 'rows.pt')
    with pytest.raises(InputError, match='rows outside the 2-row embedding'):
        ReferenceBank.from_file(str(tmp_path / 'rows.pt'))
    bank = ReferenceBank([1], dim=8)
    with pytest.raises(InputError, match='bank width 8 differs from the BERT width 16'):
        bank.check_dim(16, 'x')


# --- gradient average over processes ------------------------------------------------------------------

def _sync_worker(rank, world, init_file, results):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        grad = torch.zeros(10, 3, 4)
        rows = torch.tensor([[1, 4, -1, 7], [4, -1, -1, -1]][rank])  # row 4 on both ranks; rank 1 mostly empty
        for r in rows[rows >= 0].tolist():
            grad[r] = torch.randn(3, 4, generator=g)
        dense = grad.clone()
        dist.all_reduce(dense)
        dense /= world
        sync_bank_grad_(grad, rows)
        results[rank] = (grad, dense)
    finally:
        dist.destroy_process_group()


def test_row_sparse_gradient_average_equals_dense_all_reduce(tmp_path):
    results = mp.Manager().dict()
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_sync_worker, args=(2, init_file, results), nprocs=2, join=True)
    for rank in range(2):
        got, want = results[rank]
        assert torch.allclose(got, want, atol=1e-7, rtol=0)
    assert torch.equal(results[0][0], results[1][0])


def test_sync_is_identity_in_one_process():
    grad = torch.randn(4, 2, 2)
    assert torch.equal(sync_bank_grad_(grad.clone(), torch.tensor([0, 2])), grad)


# --- EMA ----------------------------------------------------------------------------------------------

def test_ema_momentum_schedule():
    assert ema_momentum(0, 0, 10) == pytest.approx(0.95)
    assert ema_momentum(0, 5, 10) == pytest.approx(0.97)
    assert ema_momentum(1, 0, 10) == pytest.approx(0.99)
    assert ema_momentum(2, 0, 10) == pytest.approx(0.9945)
    assert ema_momentum(2, 9, 10) == pytest.approx(0.99 + 0.009 * 1.9 / 2)
    assert ema_momentum(3, 0, 10) == 0.9995 and ema_momentum(39, 7, 10) == 0.9995


def test_ema_update_parameters_follow_formula_buffers_stay():
    torch.manual_seed(0)
    student, teacher = TinyLavt(), TinyLavt()
    student.train()(torch.randn(2, 3, 8, 8), torch.randn(2, 16, 4), torch.ones(2, 4, 1))  # move BN stats
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(teacher, student, 0.97)
    params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        assert torch.allclose(p, 0.97 * before[name] + 0.03 * params[name], atol=1e-7, rtol=0), name
    for name, b in teacher.named_buffers():
        assert torch.equal(b, before[name]), name


# --- stage 3's inner loop ------------------------------------------------------------------------------

def test_inner_loop_changes_only_the_bank():
    """Bank steps through the teacher leave the student's and BERT's weights and .grad untouched."""
    torch.manual_seed(0)
    student, bert = TinyLavt(), tiny_bert(2)
    teacher = TinyLavt().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bank = ReferenceBank([100, 101], n_prompt=4, dim=16)
    batch = make_batch(b=3, seed=1)
    batch['ref_id'] = torch.tensor([100, 7, 101])
    opt = build_bank_optimizer(bank, 1e-2, opt_args())
    sched = build_poly_scheduler(opt, 4)
    joint = Stage3Joint(student, teacher, bert, bank, build_criterion(), opt, sched, inner_steps=2,
                        update_every=1, is_weak=torch.ones(3, dtype=torch.bool), batch_size=3, world_size=1,
                        seed=0, steps_per_epoch=1, amp=False)
    joint.plan = [True]
    snapshot = {f'{n}.{k}': v.clone() for n, m in (('student', student), ('bert', bert), ('teacher', teacher))
                for k, v in m.state_dict().items()}
    bank_before = bank.embedding.detach().clone()
    joint.before_step(0, batch)
    for n, m in (('student', student), ('bert', bert), ('teacher', teacher)):
        for k, v in m.state_dict().items():
            assert torch.equal(v, snapshot[f'{n}.{k}']), f'{n}.{k}'
        assert all(p.grad is None for p in m.parameters()), n
    assert joint.bank_steps_taken == 2 and sched.last_epoch == 2
    assert not torch.equal(bank.embedding, bank_before)


# --- which iterations take bank steps -------------------------------------------------------------------

class Ids(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize('world', [1, 2, 3])
@pytest.mark.parametrize('update_every', [1, 2, 3])
def test_bank_step_plan_matches_real_loader_batches(world, update_every):
    g = torch.Generator().manual_seed(world * 10 + update_every)
    n, batch, seed = 53, 4, 11
    is_weak = torch.rand(n, generator=g) < 0.15  # sparse, so some batches have no weak sample
    for epoch in range(3):
        batches = []
        for rank in range(world):
            sampler = DistributedSampler(Ids(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
            batches.append(list(DataLoader(Ids(n), batch_size=batch, sampler=sampler, drop_last=True)))
        want = [any(bool(is_weak[b[i]].any()) for b in batches) and i % update_every == 0
                for i in range(len(batches[0]))]
        assert bank_step_plan(is_weak, batch, world, seed, epoch, update_every) == want
    total = count_bank_steps(is_weak, batch, world, seed, 3, update_every, inner_steps=2)
    assert total == 2 * sum(sum(bank_step_plan(is_weak, batch, world, seed, e, update_every)) for e in range(3))
