"""The pipeline from the command line to the table and figures: validate, plan, run (or follow node 0),
write the table (with intervals), the breakdown and the scores plot, and draw the figure."""
import os
import shutil
import sys
import time

import utils
from utils import InputError

from .channel import PlanChannel, follow
from .config import EVAL_SPLITS, build_parser, ratio_tag, validate
from .figure import figure_step
from .manifests import Manifests, file_digest, git_info, now, read_json, with_suppress, write_json
from .plan import Plan
from .plot import draw_scores
from .progress import Printer, hms
from .report import trivial_scores, write_table
from .runner import execute
from .significance import BREAKDOWN_FILE, CACHE_FILE, PLOT_FILE, write_breakdown


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = validate(args)
    plan = Plan(cfg)
    say = Printer()
    if not cfg.is_leader:
        return follow(cfg, plan, say)

    data_digest = file_digest([cfg.data / args.dataset / f'refs({args.splitBy}).p',
                               cfg.data / args.dataset / 'instances.json'])
    manifests = Manifests(plan, data_digest)
    if args.fresh:
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
    say(f'pipeline: {len(plan.steps)} steps ({trainings} trainings) for shares '
        f"{', '.join(ratio_tag(r) + ' %' for r in cfg.ratios)}{' and 100 %' if args.full else ''} in {cfg.out}")
    trivial = read_json(cfg.out / 'trivial.json')
    if not trivial or trivial.get('data') != data_digest:
        trivial = {'data': data_digest, **trivial_scores(cfg)}
        write_json(cfg.out / 'trivial.json', trivial)
    trivial = {split: trivial[split] for split in EVAL_SPLITS}
    table_state = {'written': False}

    def on_step_done(step):
        if step.kind == 'test':
            write_table(plan, trivial)
            table_state['written'] = True

    channel = PlanChannel(cfg) if args.nnodes > 1 else None
    ok = False
    try:
        execute(cfg, plan, manifests, say, on_step_done, channel)
        ok = True
    finally:
        if channel is not None:
            channel.close(ok)
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


def clear_outputs(cfg):
    """--fresh: every step's files go (the folder is a pipeline folder, checked by validate)."""
    for name in ('stages', 'splits', 'results', 'logs'):
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
