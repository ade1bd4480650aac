"""Evaluation that tells a gain from noise: test.py's per-sentence records and what is computed from them.

    records.py    SentenceRecords (one row per sentence: ref, sentence, category, weak or accurate, target
                  area, I, U), save / load_records (.npz), summary (the printed metrics, exactly),
                  check_comparable (same dataset, split, size and sentences), records_path / breakdown_path
    compare.py    bootstrap intervals over refs (`interval`), paired differences with a permutation p-value
                  (`paired_difference`), two levels (seeds, then refs) for several seeds; the command
                  `python -m lib.evaluation.compare A.npz B.npz`
    breakdown.py  per-category and per-size (small / medium / large target) tables with intervals

Builds on lib.files, refer and utils only (no torch): the command starts fast. The method is in
docs/evaluation.md.
"""
