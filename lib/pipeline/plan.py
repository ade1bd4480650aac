"""The steps of the pipeline (Step) and their order and command lines (Plan): per accurate share the
splits, the four trainings and the tests of each method's best checkpoint (each writes its metrics JSON
and its per-sentence records)."""
import os
from pathlib import Path

from lib.evaluation.records import records_path

from .config import EVAL_SPLITS, FULL_METHOD, METHODS, MODEL_ID, ratio_tag


def _local_path(value):
    """An existing local path as an absolute path; a hub name (no such path, no separator) unchanged."""
    if value and os.path.exists(value):
        return str(Path(value).absolute())
    return value


class Step:
    """One script run. kind: splits | train | test. `outputs`: the files a finished step has."""

    def __init__(self, name, kind, script, args, outputs, deps=(), resumable=False, label=''):
        self.name, self.kind, self.script, self.args = name, kind, script, [str(a) for a in args]
        self.outputs = [Path(o) for o in outputs]
        self.deps = list(deps)
        self.resumable = resumable  # continues from model_last_<id>.pth with --resume
        self.label = label or name
        self.epochs = None

    @property
    def distributed(self):  # through torchrun when there are several processes
        return self.kind != 'splits'

    def __repr__(self):
        return f'Step({self.name})'


class Plan:
    def __init__(self, cfg):
        self.cfg = cfg
        a = cfg.args
        out = cfg.out
        self.stages, self.logs, self.results = out / 'stages', out / 'logs', out / 'results'
        self.steps = []
        self.methods = {}  # (share, method) -> best checkpoint
        common = ['--dataset', a.dataset, '--splitBy', a.splitBy, '--swin_type', a.swin_type, '--img_size', a.img_size,
                  '--ck_bert', _local_path(a.ck_bert), '--bert_tokenizer', _local_path(cfg.tokenizer),
                  '--workers', a.workers, '--device', cfg.device]
        if cfg.window12:
            common.append('--window12')
        if a.amp:
            common.append('--amp')
        self.test_common = common + cfg.extra
        swin = _local_path(a.pretrained_swin_weights) if a.pretrained_swin_weights else ''
        self.train_common = common + ['--pretrained_swin_weights', swin, '--batch-size', a.batch_size, '--seed',
                                      a.seed, '--model_id', MODEL_ID, '--print-freq', a.print_freq] + cfg.extra
        if a.full:
            self._full()
        for share in cfg.ratios:
            self._share(share)

    def stage_dir(self, name):
        return self.stages / name

    def _train(self, name, script, root, epochs, lr, extra=(), deps=(), outputs=(), label=''):
        d = self.stage_dir(name)
        step = Step(name, 'train', script, ['--refer_data_root', root, '--epochs', epochs, '--lr', lr,
                                            '--output-dir', d, *self.train_common, *extra],
                    [d / f'model_last_{MODEL_ID}.pth', *[d / o for o in outputs]], deps, resumable=True, label=label)
        step.epochs = epochs
        self.steps.append(step)
        return step

    def _tests(self, prefix, method, checkpoint, train_step):
        for split in EVAL_SPLITS:
            name = f'{prefix}-{method}-{split}'
            result = self.results / f'{name}.json'
            self.steps.append(Step(name, 'test', 'test.py',
                                   ['--refer_data_root', self.cfg.data, '--resume', checkpoint, '--split', split,
                                    '--results_json', result, '--overwrite', *self.test_common],
                                   [result, records_path(result)], [train_step.name],
                                   label=f'{prefix} {method} test on {split}'))

    def _full(self):
        e = self.cfg.epochs['full']
        step = self._train('acc100-rmsin', 'train.py', self.cfg.data, e, self.cfg.args.lr,
                           outputs=[f'model_best_{MODEL_ID}.pth'], label='100 % RMSIN')
        best = step.outputs[1]
        self.methods[(100.0, FULL_METHOD[0])] = best
        self._tests('acc100', FULL_METHOD[0], best, step)

    def _share(self, share):
        cfg, a = self.cfg, self.cfg.args
        prefix = f'acc{ratio_tag(share)}'
        weak = ratio_tag(100 - share)
        split_dir = cfg.out / 'splits' / prefix
        roots = {view: split_dir / f'{a.dataset}-{weak}-{view}' for view in ('all', 'no-mask', 'mask')}
        splits = Step(f'{prefix}-splits', 'splits', 'mask_train_only.py',
                      ['--refer_data_root', cfg.data, '--dataset', a.dataset, '--splitBy', a.splitBy,
                       '--output_dir', split_dir, '--ratios', weak, '--seed', a.split_seed, '--overwrite'],
                      [roots[v] / a.dataset / f'refs({a.splitBy}).p' for v in roots], label=f'{prefix} splits')
        self.steps.append(splits)
        teacher_file = (f'model_last_{MODEL_ID}.pth' if cfg.teacher == 'last'
                        else f'model_epoch_{cfg.teacher}.pth')
        e = cfg.epochs
        only = self._train(f'{prefix}-only-accurate', 'train.py', roots['no-mask'], e['stage1'], a.lr,
                           deps=[splits.name], outputs=[f'model_best_{MODEL_ID}.pth', teacher_file],
                           label=f'{prefix} Only Accurate (= LRB stage 1)')
        naive = self._train(f'{prefix}-naive-wrel', 'train.py', roots['all'], e['naive'], a.lr,
                            deps=[splits.name], outputs=[f'model_best_{MODEL_ID}.pth'], label=f'{prefix} Naive-WREL')
        teacher = self.stage_dir(only.name) / teacher_file
        s2 = self._train(f'{prefix}-lrb-stage2', 'train_stu_base.py', roots['mask'], e['stage2'], a.stage2_lr,
                         extra=['--resume', teacher], deps=[only.name],
                         outputs=[f'caption_embeddings_{MODEL_ID}.pt'], label=f'{prefix} LRB stage 2')
        bank = self.stage_dir(s2.name) / f'caption_embeddings_{MODEL_ID}.pt'
        s3 = self._train(f'{prefix}-lrb-stage3', 'train_stu_tea.py', roots['all'], e['stage3'], a.stage3_lr,
                         extra=['--caption_lr', a.caption_lr, '--caption_inner_steps', a.caption_inner_steps,
                                '--caption_update_every', a.caption_update_every, '--resume', teacher,
                                '--caption_embedding_path', bank],
                         deps=[only.name, s2.name], outputs=[f'model_best_oIoU_{MODEL_ID}.pth'],
                         label=f'{prefix} LRB stage 3')
        for (method, _), step, ckpt in zip(METHODS, (only, naive, s3),
                                           (f'model_best_{MODEL_ID}.pth', f'model_best_{MODEL_ID}.pth',
                                            f'model_best_oIoU_{MODEL_ID}.pth')):
            best = self.stage_dir(step.name) / ckpt
            self.methods[(share, method)] = best
            self._tests(prefix, method, best, step)

    def shares(self):
        """The table's shares: 100 (--full) first, then --ratios."""
        return ([100.0] if self.cfg.args.full else []) + list(self.cfg.ratios)

    def result_file(self, share, method, split):
        return self.results / f'acc{ratio_tag(share)}-{method}-{split}.json'

    def records_files(self, share, method, split):
        """test.py's per-sentence records of a method on a split, one file per training seed (one today)."""
        return [Path(records_path(self.result_file(share, method, split)))]
