"""The job graph of reproduce.py's table and its wall time, estimated: how many jobs, how deep the longest
chain of trainings, and the hours on one node (steps one after another, as --launcher local runs them)
against a cluster (--launcher slurm: every job as soon as its inputs exist, one node per training).

The estimate is arithmetic, not a measurement: a training's time is epochs x (its steps per epoch x
seconds per step + one validation); steps per epoch come from the real RRSIS-D refs (shared/rrsisd) and the
accurate share (Only Accurate trains on the accurate refs, stage 2 on the weak ones, the others on all);
seconds per step default to the H100 figures in docs/benchmarks.md (paper batch, 4 GPUs: 4.10 it/s for
stage 1; stage 2 x0.77, stage 3 x1.85 of stage 1, measured fp32 on the H100).

    python bench/bench_job_graph.py                       # the paper's table: 10/30/50 % + --full, 1 and 3 seeds
    python bench/bench_job_graph.py --step_seconds 0.3 --val_seconds 120
"""
import argparse
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.pipeline.config import Config, build_parser  # noqa: E402
from lib.pipeline.plan import Plan  # noqa: E402

STAGE_FACTOR = {'train.py': 1.0, 'train_stu_base.py': 0.77, 'train_stu_tea.py': 1.85}


def train_refs(refs_file):
    with open(refs_file, 'rb') as f:
        return sum(r['split'] == 'train' for r in pickle.load(f))


def step_hours(step, a, n_train):
    if step.kind != 'train':  # a test: one forward per sentence, as a validation pass
        return a.test_seconds / 3600
    share = float(step.name.split('-')[0][3:]) / 100
    refs = {'only-accurate': share, 'lrb-stage2': 1 - share}.get(step.name.split('-', 1)[1].split('-seed')[0], 1.0)
    steps = n_train * refs / a.batch_size
    seconds = step.epochs * (steps * a.step_seconds * STAGE_FACTOR[step.script] + a.val_seconds)
    return seconds / 3600


def graph(a, seeds, n_train):
    argv = ['--refer_data_root', '/data', '--output_dir', '/out', '--epochs', str(a.epochs),
            '--ratios', *map(str, a.ratios),
            '--seeds', *map(str, seeds)] + (['--full'] if a.full else [])
    cfg = Config(build_parser().parse_args(argv))
    plan = Plan(cfg)
    hours = {s.name: step_hours(s, a, n_train) for s in plan.steps if s.kind != 'splits'}
    finish, depth = {}, {}
    for s in plan.steps:  # plan order is a topological order
        start = max((finish[d] for d in s.deps), default=0.0)
        finish[s.name] = start + hours.get(s.name, 0.0)
        depth[s.name] = max((depth[d] for d in s.deps), default=0) + (s.kind == 'train')
    trainings = [s for s in plan.steps if s.kind == 'train']
    return {'jobs': len(plan.steps), 'trainings': len(trainings), 'tests': sum(s.kind == 'test' for s in plan.steps),
            'chain': max(depth.values()), 'one_node_h': sum(hours.values()), 'cluster_h': max(finish.values()),
            'nodes': len(trainings)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--refs', default=str(Path(__file__).resolve().parents[2] / 'shared' / 'rrsisd' / 'refs(unc).p'))
    p.add_argument('--ratios', type=float, nargs='+', default=[10, 30, 50])
    p.add_argument('--full', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--epochs', type=int, default=40)
    p.add_argument('--batch_size', type=int, default=8, help='global batch (the paper: 2 per GPU x 4 GPUs)')
    p.add_argument('--step_seconds', type=float, default=1 / 4.10, help='stage-1 seconds per step (H100: 4.10 it/s)')
    p.add_argument('--val_seconds', type=float, default=60.0, help='one validation pass (assumed)')
    p.add_argument('--test_seconds', type=float, default=120.0, help='one test.py run (assumed)')
    a = p.parse_args()
    n_train = train_refs(a.refs)
    print(f'RRSIS-D: {n_train} train refs -> {n_train / a.batch_size:.0f} steps per epoch at batch {a.batch_size}; '
          f'{a.epochs} epochs; {a.step_seconds * 1000:.0f} ms per stage-1 step, validation {a.val_seconds:.0f} s, '
          f'test {a.test_seconds:.0f} s (estimates)')
    print('| seeds | jobs | trainings | tests | longest chain (trainings) | one 4-GPU node | cluster (nodes) |')
    print('|---|---|---|---|---|---|---|')
    for seeds in ([2401], [2401, 1, 2]):
        g = graph(a, seeds, n_train)
        print(f"| {len(seeds)} | {g['jobs']} | {g['trainings']} | {g['tests']} | {g['chain']} | "
              f"{g['one_node_h']:.1f} h | {g['cluster_h']:.1f} h ({g['nodes']}) |")


if __name__ == '__main__':
    main()
