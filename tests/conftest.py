"""Session fixtures shared by the whole test suite.

shared_dir        Path of ../shared (the real RRSIS-D refs); tests using it skip when it is absent.
rrsisd_refs_root  data root holding the real 17,402 refs + a synthesized instances.json (no images).
demo_root         a small generated demo data root (40 images, 64 px), RRSIS-D layout.
small_bert_dir    a small BERT (tokenizer + random weights) built on the demo expressions.

Under pytest-xdist (make test: 2 workers) each worker's torch gets its share of the cores, as the scripts the
tests run get OMP_NUM_THREADS=1: two workers of 2 threads each on 2 cores only wait for each other.
"""
import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / 'shared'
SHARED_REFS = SHARED_DIR / 'rrsisd' / 'refs(unc).p'


@pytest.fixture(scope='session')
def shared_dir():
    if not SHARED_REFS.is_file():
        pytest.skip(f'shared data not found at {SHARED_DIR}')
    return SHARED_DIR


def write_refs_root(root, refs_file, instances):
    """Lay out <root>/rrsisd/{refs(unc).p, instances.json}; the refs file is linked, not copied."""
    data_dir = Path(root) / 'rrsisd'
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / 'refs(unc).p'
    if not link.exists():
        os.symlink(refs_file, link)
    with open(data_dir / 'instances.json', 'w') as f:
        json.dump(instances, f)
    return Path(root)


@pytest.fixture(scope='session')
def rrsisd_refs_root(shared_dir, tmp_path_factory):
    from refer.demo_data import load_categories, synthesize_instances
    from refer.refer import load_refs

    refs = load_refs(str(SHARED_REFS))
    categories = load_categories(shared_dir / 'rrsisd' / 'categories.json')
    instances = synthesize_instances(refs, categories, category_key='categories_id')
    return write_refs_root(tmp_path_factory.mktemp('rrsisd_refs'), SHARED_REFS, instances)


@pytest.fixture(scope='session')
def demo_root(tmp_path_factory):
    from refer.demo_data import generate

    root = tmp_path_factory.mktemp('demo') / 'data'
    generate(root, images=40, size=64, seed=0)
    return root


@pytest.fixture(scope='session')
def small_bert_dir(demo_root, tmp_path_factory):
    from bert.build_small import build_small_bert, collect_expressions

    out = tmp_path_factory.mktemp('small_bert') / 'bert'
    build_small_bert(collect_expressions(demo_root, 'rrsisd', 'unc'), out,
                     hidden_size=32, num_hidden_layers=10, num_attention_heads=2, seed=0)
    return out


@pytest.fixture(scope='session', autouse=True)
def _cores_shared_between_workers():
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        import torch
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // workers))
    yield


def _single_threaded():
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """In-process runs use one thread, like the subprocesses (OMP_NUM_THREADS=1): no oversubscription."""
    yield from _single_threaded()


@pytest.fixture(scope='module')
def one_thread_per_module():
    """The same for a whole test file (`pytestmark = pytest.mark.usefixtures('one_thread_per_module')`):
    its tiny ops on 2 shared cores run far faster single-threaded; restored afterwards."""
    yield from _single_threaded()
