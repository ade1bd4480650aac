"""The table: each method's test results per accurate share, in the paper's form (table.md) with each cell's
95 % interval and the paired differences per share (significance.py), and as JSON (table.json) with every
number (every seed's), the configuration, the git commit and the trivial all-object scores."""
import statistics

from lib import files

from .config import COLUMNS, EVAL_SPLITS, FULL_METHOD, METHODS, ratio_tag
from .manifests import git_info, now, read_json, write_json
from .significance import (DIFFERENCES_HEAD, METHOD_TEXT, Records, cell_interval, column_key, differences,
                           differences_markdown, errors, format_interval, interval_note, settings)


def trivial_scores(cfg):
    """oIoU / mIoU (percent) of predicting every pixel as the object, per split, over every sentence
    (as test.py counts them), from the masks at the images' own size."""
    from refer.refer import REFER
    refer = REFER(str(cfg.data), cfg.args.dataset, cfg.args.splitBy)
    scores = {}
    for split in EVAL_SPLITS:
        cum_i = cum_u = 0.0
        fractions = []
        for ref_id in refer.getRefIds(split=split):
            ref = refer.Refs[ref_id]
            img = refer.Imgs[ref['image_id']]
            area = refer.getMask(ref)['area']
            pixels = img['height'] * img['width']
            k = len(ref['sentences'])
            cum_i += k * area
            cum_u += k * pixels
            fractions += [area / pixels] * k
        scores[split] = {'oIoU': 100 * cum_i / cum_u if cum_u else 0.0,
                         'mIoU': 100 * sum(fractions) / len(fractions) if fractions else 0.0}
    return scores


def table_rows(plan, records=None):
    """One row per share and method: the four cells (the mean over training seeds, rounded as printed;
    with several seeds each seed's value and the sd), the sentences tested, and with `records`
    (significance.Records) each cell's interval ('intervals')."""
    rows = []
    several = len(plan.cfg.seeds) > 1
    for share in plan.shares():
        methods = [FULL_METHOD] if share == 100.0 else METHODS
        for key, label in methods:
            row = {'ratio': share, 'method': label, 'checkpoint': str(plan.methods[(share, key)])}
            if several:
                row.update(seeds=list(plan.cfg.seeds), per_seed={}, sd={})
            for metric, split in COLUMNS:
                results = [read_json(p) for p in plan.result_files(share, key, split)]
                values = [r[metric] for r in results if r]
                k = f'{metric}_{split}'
                row[k] = round(statistics.fmean(values), 2) if values and len(values) == len(results) else None
                if several:
                    row['per_seed'][k] = [r[metric] if r else None for r in results]
                    row['sd'][k] = round(statistics.stdev(values), 2) if row[k] is not None else None
            for split in EVAL_SPLITS:
                res = read_json(plan.result_files(share, key, split)[0])
                row[f'num_sentences_{split}'] = res.get('num_sentences') if res else None
            if records is not None:
                row['intervals'] = {column_key(c): cell_interval(records, share, key, c) for c in COLUMNS
                                    if row[column_key(c)] is not None}
            rows.append(row)
    return rows


def table_markdown(rows):
    """The paper's table; each cell followed by its interval when there is one, the best of a share bold."""
    head = '| Ratio | Method | oIoU Val | oIoU Test | mIoU Val | mIoU Test |'
    lines = [head, '|-------|--------|----------|-----------|----------|-----------|']
    best = {}
    for row in rows:
        if row['method'] == FULL_METHOD[1]:
            continue
        for metric, split in COLUMNS:
            k = f'{metric}_{split}'
            if row[k] is not None:
                best[(row['ratio'], k)] = max(best.get((row['ratio'], k), -1.0), row[k])
    previous = None
    for row in rows:
        ratio = f"{ratio_tag(row['ratio'])}%" if row['ratio'] != previous else ''
        previous = row['ratio']
        cells = []
        for metric, split in COLUMNS:
            k = f'{metric}_{split}'
            v = row[k]
            text = '–' if v is None else f'{v:.2f}'
            if v is not None and row['method'] != FULL_METHOD[1] and v == best.get((row['ratio'], k)):
                text = f'**{text}**'
            if v is not None and row.get('sd', {}).get(k) is not None:
                text += f" ± {row['sd'][k]:.2f}"
            interval = format_interval(row.get('intervals', {}).get(k))
            cells.append(f'{text} {interval}' if interval else text)
        lines.append(f"| {ratio:<5} | {row['method']} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def describe_git(g):
    return f"{g.get('commit') or 'unknown'}{' (with uncommitted changes)' if g.get('dirty') else ''}"


def steps_git(plan):
    """{step: the git commit (and dirtiness) it ran at}, from the manifests of the finished steps."""
    out = {}
    for step in plan.steps:
        done = read_json(plan.stage_dir(step.name) / 'stage.json')
        if done and isinstance(done.get('git'), dict):
            out[step.name] = done['git']
    return out


def table_config(cfg):
    a = cfg.args
    return {
        'dataset': a.dataset, 'refer_data_root': str(cfg.data), 'ratios': cfg.ratios, 'full': a.full,
        'epochs': cfg.epochs, 'teacher': f'Only-Accurate run, {teacher_text(cfg)}', 'batch_size': a.batch_size,
        'lr': a.lr, 'stage2_lr': a.stage2_lr, 'stage3_lr': a.stage3_lr, 'caption_lr': a.caption_lr,
        'caption_inner_steps': a.caption_inner_steps, 'caption_update_every': a.caption_update_every,
        'seeds': cfg.seeds, 'split_seed': a.split_seed, 'swin_type': a.swin_type, 'img_size': a.img_size,
        'window12': cfg.window12, 'pretrained_swin_weights': a.pretrained_swin_weights, 'ck_bert': a.ck_bert,
        'amp': a.amp, 'extra_args': a.extra_args, 'device': cfg.device, 'processes': cfg.world,
        'checkpoints': 'each run\'s best val-oIoU checkpoint (model_best; LRB-WREL: stage 3\'s model_best_oIoU)'}


def seeds_text(seeds):
    return (f'seed {seeds[0]}' if len(seeds) == 1 else
            f"training seeds {', '.join(map(str, seeds))} (each cell: mean ± sd over them)")


def teacher_text(cfg):
    return ('final weights (model_last, --teacher_epoch last)' if cfg.teacher == 'last'
            else f'model_epoch_{cfg.teacher}.pth')


def write_table(plan, trivial):
    """table.json (every number, unrounded intervals and differences included) and table.md: the paper's
    table with each cell's interval, the paired differences per share, and notes on how it was made."""
    cfg, a = plan.cfg, plan.cfg.args
    records = Records(plan)
    rows = table_rows(plan, records)
    have = {(r['ratio'], r['method'], column_key(c)) for r in rows for c in COLUMNS if r[column_key(c)] is not None}
    diffs = differences(records, list(cfg.ratios), lambda share, label, k: (share, label, k) in have)
    records.save()
    seeds = len(plan.records_files(min(cfg.ratios), METHODS[0][0], 'test'))
    g = git_info()
    data = {'dataset': a.dataset, 'columns': ['ratio', 'method'] + [f'{m}_{s}' for m, s in COLUMNS], 'rows': rows,
            'differences': diffs, 'significance': {**settings(), 'training_seeds': seeds, 'method': METHOD_TEXT},
            'trivial': trivial, 'config': table_config(cfg), 'git': g, 'steps_git': steps_git(plan),
            'written': now()}
    epochs = cfg.epochs
    e_text = (f'{epochs["stage1"]} epochs each' if len(set(epochs.values())) == 1 else
              f'Only Accurate {epochs["stage1"]}, Naive-WREL {epochs["naive"]}, LRB stage 2 {epochs["stage2"]}, '
              f'stage 3 {epochs["stage3"]}' + (f', RMSIN {epochs["full"]}' if a.full else '') + ' epochs')
    notes = [
        f'Dataset `{a.dataset}`; ratio = share of train expressions kept accurate; oIoU / mIoU in percent over '
        f'every sentence of the split; each method tested at its best val-oIoU checkpoint.',
        f'Swin-{a.swin_type}, {a.img_size} px, batch {a.batch_size}, {e_text}; lr {a.lr:g} '
        f'(stage 2 {a.stage2_lr:g}, stage 3 {a.stage3_lr:g}, bank {a.caption_lr:g}); LRB teacher: the Only-Accurate '
        f'run\'s {teacher_text(cfg)}; {seeds_text(cfg.seeds)}; {cfg.world} process(es) on {cfg.device}.',
        interval_note(seeds),
    ]
    notes += [f'No interval: {e}.' for e in errors(rows, diffs)[:3]]
    if trivial:
        notes.append('Every pixel predicted as the object scores oIoU {:.2f} / {:.2f} and mIoU {:.2f} / {:.2f} '
                     '(val / test).'.format(trivial['val']['oIoU'], trivial['test']['oIoU'],
                                            trivial['val']['mIoU'], trivial['test']['mIoU']))
    ran = sorted({describe_git(v) for v in data['steps_git'].values()})
    notes.append(f"Code: the steps ran at git commit {', '.join(ran) or 'unknown'}; table written at "
                 f'{describe_git(g)}.' if ran != [describe_git(g)] else f'Code: git commit {describe_git(g)}.')
    markdown = (f'## {a.dataset}: Only Accurate vs Naive-WREL vs LRB-WREL\n\n' + table_markdown(rows) + '\n\n'
                + DIFFERENCES_HEAD + '\n\n' + differences_markdown(diffs) + '\n\n'
                + '\n'.join(f'- {n}' for n in notes) + '\n')
    write_json(cfg.out / 'table.json', data)
    files.write_text_atomic(cfg.out / 'table.md', markdown)
    return markdown
