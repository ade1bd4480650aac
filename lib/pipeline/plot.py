"""The scores plot (scores.png): each method's test oIoU per accurate share, with its 95 % interval and,
with several training seeds, each seed's score as a dot; drawn from table.json's numbers."""
from lib import files

from .config import FULL_METHOD, METHODS, ratio_tag

COLORS = {'Only Accurate': '#7f7f7f', 'Naive-WREL': '#1f77b4', 'LRB-WREL': '#d62728', FULL_METHOD[1]: '#2ca02c'}
COLUMN = 'oIoU_test'


def draw_scores(table, path, column=COLUMN):
    """table: the dict of table.json. -> path, or None when no cell of `column` has a value yet."""
    rows = [r for r in table['rows'] if r.get(column) is not None]
    if not rows:
        return None
    import matplotlib
    matplotlib.use('Agg')  # headless: no display on a training node
    import matplotlib.pyplot as plt

    shares = sorted({r['ratio'] for r in rows})
    labels = [label for _, label in METHODS] + [FULL_METHOD[1]]
    width = 0.8 / len(METHODS)
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 1.9 * len(shares)), 3.8), dpi=150)
    drawn = set()
    for row in rows:
        x = shares.index(row['ratio'])
        if row['method'] != FULL_METHOD[1]:
            x += (labels.index(row['method']) - (len(METHODS) - 1) / 2) * width
        color = COLORS.get(row['method'], 'black')
        iv = (row.get('intervals') or {}).get(column) or {}
        value = iv.get('value', row[column])
        legend = row['method'] if row['method'] not in drawn else None
        drawn.add(row['method'])
        if 'low' in iv:
            ax.errorbar(x, value, yerr=[[value - iv['low']], [iv['high'] - value]], fmt='o', color=color,
                        capsize=4, markersize=6, linewidth=1.5, label=legend)
        else:
            ax.plot(x, value, 'o', color=color, markersize=6, label=legend)
        seeds = iv.get('seeds') or []
        if len(seeds) > 1:
            ax.plot([x + width * 0.28] * len(seeds), seeds, '.', color=color, alpha=0.6, markersize=5)
        left = len(seeds) > 1  # the seeds' dots are on the right
        ax.annotate(f'{row[column]:.2f}', (x, value), xytext=(-5 if left else 5, 0), textcoords='offset points',
                    fontsize=7, va='center', ha='right' if left else 'left', color=color)
    ax.set_xticks(range(len(shares)), [f'{ratio_tag(s)} %' for s in shares])
    ax.set_xlim(-0.6, len(shares) - 0.4)
    ax.set_xlabel('accurate expressions in train')
    metric, split = column.split('_')
    ax.set_ylabel(f'{split} {metric} (%)')
    seeds = max(len(((r.get('intervals') or {}).get(column) or {}).get('seeds') or [1]) for r in rows)
    ax.set_title(f"{table.get('dataset', '')}: {split} {metric} per accurate share\n95 % intervals, bootstrap over "
                 f"the refs; {f'dots: the {seeds} training seeds' if seeds > 1 else '1 training seed'}", fontsize=9)
    ax.grid(axis='y', alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc='best')
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(path) as tmp:
        with open(tmp, 'wb') as f:  # a file object: savefig would pick the format from the temporary name
            fig.savefig(f, format='png')
    plt.close(fig)
    return path
