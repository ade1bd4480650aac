"""The pipeline from the command line to the table and figures: validate, plan, run the steps here
(--launcher local) or submit them to SLURM and follow the jobs (--launcher slurm), write the table (with
intervals), the breakdown and the scores plot, and draw the figure."""
import os
import shutil
import sys
import time

import utils
from utils import InputError

from . import slurm
from .config import EVAL_SPLITS, build_parser, ratio_tag, validate
from .figure import figure_step
from .follow import follow
from .locks import StepLocks
from .manifests import Manifests, file_digest, git_info, now, read_json, with_suppress, write_json
from .plan import Plan
from .plot import draw_scores
from .progress import Printer, hms
from .report import trivial_scores, write_table
from .runner import execute, python_env
from .significance import BREAKDOWN_FILE, CACHE_FILE, PLOT_FILE, write_breakdown


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = validate(args)
    plan = Plan(cfg)
    say = Printer()
    if cfg.slurm:
        slurm.check_cluster(cfg)
        slurm.check_time_limit(cfg, plan)
        locks = StepLocks(cfg.out, live_jobs=lambda ids: set(slurm.live_jobs(ids)))
        record = slurm.read_record(cfg)
        live = slurm.live_jobs([j['job_id'] for j in record.values()])
        # an earlier submission still in the queue: follow its unfinished steps (failures included)
        attached = {n: j for n, j in record.items() if live and (j['job_id'] in live or not _finished(plan, n, j))}
        if args.cancel:
            attached = {n: j for n, j in attached.items() if j['job_id'] in live}
            slurm.cancel([j['job_id'] for j in attached.values()])
            for name in attached:
                locks.release(name)
            say(f"cancelled {len(attached)} job(s) of {cfg.out}: " + (', '.join(
                f"{n} (job {j['job_id']})" for n, j in attached.items()) or 'none was pending or running'))
            return 0
    else:
        locks, attached = StepLocks(cfg.out, live_jobs=_live_jobs_if_slurm()), {}

    data_files = [cfg.data / args.dataset / f'refs({args.splitBy}).p', cfg.data / args.dataset / 'instances.json']
    data_digest = file_digest(data_files)
    manifests = Manifests(plan, data_digest, ' or '.join(map(str, data_files)))
    locks.check(s.name for s in plan.steps if s.name not in attached)
    if args.fresh:
        if attached:
            raise InputError(f'--fresh: {len(attached)} job(s) of this pipeline are still pending or running '
                             f'(e.g. {next(iter(attached))}); cancel them first (--cancel)')
        clear_outputs(cfg)
    else:  # a finished or started step with another command line: refuse before anything runs
        for step in plan.steps:
            reason = manifests.refusal(step)
            if reason:
                raise InputError(reason)
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json(cfg.out / 'pipeline.json', {'command': [sys.executable, *sys.argv] if argv is None else argv,
                                           'args': vars(args), 'steps': [s.name for s in plan.steps],
                                           'started': now(), 'git': git_info()})
    start = time.time()
    trainings = sum(s.kind == 'train' for s in plan.steps)
    seeds = f" x {len(cfg.seeds)} seeds" if len(cfg.seeds) > 1 else ''
    say(f'pipeline: {len(plan.steps)} steps ({trainings} trainings) for shares '
        f"{', '.join(ratio_tag(r) + ' %' for r in cfg.ratios)}{' and 100 %' if args.full else ''}{seeds} in {cfg.out}")
    trivial = read_json(cfg.out / 'trivial.json')
    if not trivial or trivial.get('data') != data_digest:
        trivial = {'data': data_digest, **trivial_scores(cfg)}
        write_json(cfg.out / 'trivial.json', trivial)
    trivial = {split: trivial[split] for split in EVAL_SPLITS}

    def on_step_done(step):
        if step.kind == 'test':
            write_table(plan, trivial)

    if cfg.slurm:
        if not run_on_slurm(cfg, plan, manifests, locks, attached, say, on_step_done):
            return 0
    else:
        execute(cfg, plan, manifests, say, on_step_done, locks)
    markdown = write_table(plan, trivial)
    breakdown = write_breakdown(plan)
    try:
        scores = draw_scores(read_json(cfg.out / 'table.json'), cfg.out / PLOT_FILE)
    except ImportError as e:  # the table and breakdown are there; the plot needs matplotlib
        scores = None
        say(f'{PLOT_FILE}: not drawn ({e}; pip install -r requirements.txt)')
    figure = None
    if args.figure_samples:
        figure = figure_step(plan, manifests, min(cfg.ratios), args.figure_samples, say)
    print()
    print(markdown)
    written = [cfg.out / 'table.md', cfg.out / 'table.json', breakdown] + ([scores] if scores else [])
    say(f"pipeline finished in {hms(time.time() - start)}: {', '.join(map(str, written))}"
        + (f', figure {figure} (accurate share {ratio_tag(min(cfg.ratios))} %)' if figure else ''))
    return 0


def run_on_slurm(cfg, plan, manifests, locks, attached, say, on_step_done):
    """Submit what is missing (or attach to the jobs of an earlier submission still in the queue), then
    follow them. -> False when not following (--no-follow, Ctrl-C)."""
    if attached:
        jobs = attached
        say(f'attaching to the {len(jobs)} job(s) of this pipeline still pending or running (nothing submitted)')
    else:
        jobs = slurm.submit_plan(cfg, plan, manifests, locks, python_env(cfg), say)
        write_json(slurm.record_path(cfg), {'submitted': now(), 'steps': jobs})
        say(f'submitted {len(jobs)} job(s)' if jobs else 'every step is finished: nothing submitted')
    again = "run the same command again to follow them, with --cancel to cancel them"
    if not cfg.args.follow:
        if jobs:
            say(f'not following (--no-follow); {again}')
        return not jobs
    try:
        follow(cfg, plan, jobs, say, on_step_done)
    except KeyboardInterrupt:
        print(f'\nreproduce.py: detached; the jobs run on; {again}', file=sys.stderr, flush=True)
        sys.exit(130)
    return True


def _finished(plan, name, job):
    done = read_json(plan.stage_dir(name) / 'stage.json')
    return bool(done) and done.get('result_id') == job.get('result_id')


def _live_jobs_if_slurm():
    """A local pipeline asks SLURM about job locks when SLURM is here (else it assumes they run)."""
    return (lambda ids: set(slurm.live_jobs(ids))) if shutil.which('squeue') else None


def clear_outputs(cfg):
    """--fresh: every step's files go (the folder is a pipeline folder, checked by validate)."""
    for name in ('stages', 'splits', 'results', 'logs', 'slurm', 'locks'):
        d = cfg.out / name
        if d.exists():
            trash = d.with_name(f'.{name}.old-{os.getpid()}')
            os.replace(d, trash)
            shutil.rmtree(trash)
    for name in ('table.md', 'table.json', 'figure.png', 'figure.json', 'trivial.json', CACHE_FILE, BREAKDOWN_FILE,
                 PLOT_FILE):
        with_suppress(lambda: (cfg.out / name).unlink())


def cli():
    try:
        return utils.run_cli(main)
    except KeyboardInterrupt:  # a second Ctrl-C while run_cli reports the first
        sys.exit(130)
