"""Reproduce the paper's comparison: Only Accurate, Naive-WREL and LRB-WREL per accurate-expression share,
as one table (Markdown + JSON) and one qualitative figure (PNG).

    python reproduce.py --refer_data_root DATA --dataset rrsisd --ratios 10 30 50 --nproc_per_node 4 \
        --ck_bert BERT_DIR --pretrained_swin_weights swin_base_patch4_window12_384_22k.pth --output_dir repro

Each step is the real script through its real command line, in a subprocess (with --nproc_per_node > 1
through torchrun, the original's launcher):

    per share R (weak ratio W = 100 - R):
      mask_train_only.py  --ratios W                 -> splits/accR/<dataset>-W-{all,no-mask,mask}
      train.py   on no-mask                          Only Accurate, also the stage-1 teacher
      train.py   on all                              Naive-WREL
      train_stu_base.py on mask  --resume <teacher>  LRB stage 2 (the reference bank)
      train_stu_tea.py  on all   --resume <teacher> --caption_embedding_path <stage-2 bank>   LRB stage 3
      test.py on val and test for each method's best-on-val (oIoU) checkpoint
    --full: train.py on the unmasked data (the 100 % row) and its tests

The teacher is the Only-Accurate run's model_epoch_<--teacher_epoch>.pth (15, as the original README), or
its model_last (`--teacher_epoch last`) when that run is shorter.

Output folder:
    pipeline.json           the configuration of the last invocation (marks the folder as a pipeline folder)
    table.md, table.json    the table in the paper's form, with the configuration and the git commit
    figure.png              rows of test samples: image + expression | ground truth | the three methods
    logs/<step>.log         everything each step printed (one file per step; attempts are appended)
    stages/<step>/          checkpoints of the training steps and stage.json, the manifest of a finished step
    splits/, results/       the split data roots and the metrics JSON of every test

Re-running the same command reuses every finished step (its stage.json exists, holds the same command
line and inputs, and its files exist) and continues an interrupted training step from its
model_last_<id>.pth with --resume. A step whose own command line differs is refused (one line naming the
difference), so a finished folder is never replaced silently; `--fresh` redoes everything, or delete
stages/<step> to redo one step (the steps that depend on it follow).
"""
import os
import sys

if __package__ in (None, ''):  # run as a script from anywhere: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib.pipeline.main import cli, main  # noqa: E402  (the machinery: lib/pipeline/)

__all__ = ['main', 'cli']

if __name__ == '__main__':
    cli()
