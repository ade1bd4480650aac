"""The steps of the pipeline (Step) and their order and command lines (Plan): per accurate share the
splits, then per training seed the four trainings and the tests of each method's best checkpoint (each
writes its metrics JSON and its per-sentence records). The steps of the paper's seed (2401) carry no seed
in their names; those of another seed N end in `-seed<N>`."""
import os
from pathlib import Path

from lib.evaluation.records import records_path

from .config import DEFAULT_SEED, EVAL_SPLITS, FULL_METHOD, METHODS, MODEL_ID, ratio_tag


def _local_path(value):
    """An existing local path as an absolute path; a hub name (no such path, no separator) unchanged."""
    if value and os.path.exists(value):
        return str(Path(value).absolute())
    return value


class Step:
    """One script run. kind: splits | train | test. `outputs`: the files a finished step has."""

    def __init__(self, name, kind, script, args, outputs, deps=(), resumable=False, label='', seed=None):
        self.name, self.kind, self.script, self.args = name, kind, script, [str(a) for a in args]
        self.seed = seed
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
        self.methods = {}  # (share, method) -> the first seed's best checkpoint (the figure's)
        self.results_of = {}  # (share, method, split) -> test.py's metrics JSON, one per seed
        common = ['--dataset', a.dataset, '--splitBy', a.splitBy, '--swin_type', a.swin_type, '--img_size', a.img_size,
                  '--ck_bert', _local_path(a.ck_bert), '--bert_tokenizer', _local_path(cfg.tokenizer),
                  '--workers', a.workers, '--device', cfg.device]
        if cfg.window12:
            common.append('--window12')
        if a.amp:
            common.append('--amp')
        self.test_common = common + cfg.extra
        swin = _local_path(a.pretrained_swin_weights) if a.pretrained_swin_weights else ''
        self.train_common = common + ['--pretrained_swin_weights', swin, '--batch-size', a.batch_size,
                                      '--model_id', MODEL_ID, '--print-freq', a.print_freq] + cfg.extra
        for seed in cfg.seeds if a.full else ():
            self._full(seed)
        for share in cfg.ratios:
            splits = self._splits(share)
            for seed in cfg.seeds:
                self._share(share, splits, seed)

    def stage_dir(self, name):
        return self.stages / name

    @staticmethod
    def _seed_tag(seed):
        """'' for the paper's seed (the default), '-seed<N>' for another: a step's folder depends on its seed
        alone, so adding seeds to a finished pipeline reuses what it has."""
        return '' if seed == DEFAULT_SEED else f'-seed{seed}'

    def _train(self, name, script, root, epochs, lr, seed, extra=(), deps=(), outputs=(), label=''):
        name += self._seed_tag(seed)
        d = self.stage_dir(name)
        step = Step(name, 'train', script, ['--refer_data_root', root, '--epochs', epochs, '--lr', lr,
                                            '--output-dir', d, *self.train_common, '--seed', seed, *extra],
                    [d / f'model_last_{MODEL_ID}.pth', *[d / o for o in outputs]], deps, resumable=True,
                    label=label + (f' (seed {seed})' if self._seed_tag(seed) else ''), seed=seed)
        step.epochs = epochs
        self.steps.append(step)
        return step

    def _tests(self, share, method, checkpoint, train_step):
        prefix = f'acc{ratio_tag(share)}'
        if train_step.seed == self.cfg.seeds[0]:
            self.methods[(share, method)] = checkpoint
        for split in EVAL_SPLITS:
            name = f'{prefix}-{method}-{split}{self._seed_tag(train_step.seed)}'
            result = self.results / f'{name}.json'
            self.results_of.setdefault((share, method, split), []).append(result)
            self.steps.append(Step(name, 'test', 'test.py',
                                   ['--refer_data_root', self.cfg.data, '--resume', checkpoint, '--split', split,
                                    '--results_json', result, '--overwrite', *self.test_common],
                                   [result, records_path(result)], [train_step.name],
                                   label=f'{train_step.label}: test on {split}', seed=train_step.seed))

    def _full(self, seed):
        e = self.cfg.epochs['full']
        step = self._train('acc100-rmsin', 'train.py', self.cfg.data, e, self.cfg.args.lr, seed,
                           outputs=[f'model_best_{MODEL_ID}.pth'], label='100 % RMSIN')
        self._tests(100.0, FULL_METHOD[0], step.outputs[1], step)

    def _splits(self, share):
        """mask_train_only.py for one share: the three views of the train refs (--split_seed, not the
        training seed: every seed trains on the same split)."""
        cfg, a = self.cfg, self.cfg.args
        prefix = f'acc{ratio_tag(share)}'
        weak = ratio_tag(100 - share)
        split_dir = cfg.out / 'splits' / prefix
        roots = {view: split_dir / f'{a.dataset}-{weak}-{view}' for view in ('all', 'no-mask', 'mask')}
        step = Step(f'{prefix}-splits', 'splits', 'mask_train_only.py',
                    ['--refer_data_root', cfg.data, '--dataset', a.dataset, '--splitBy', a.splitBy,
                     '--output_dir', split_dir, '--ratios', weak, '--seed', a.split_seed, '--overwrite'],
                    [roots[v] / a.dataset / f'refs({a.splitBy}).p' for v in roots], label=f'{prefix} splits')
        step.roots = roots
        self.steps.append(step)
        return step

    def _share(self, share, splits, seed):
        cfg, a = self.cfg, self.cfg.args
        prefix, roots = f'acc{ratio_tag(share)}', splits.roots
        teacher_file = (f'model_last_{MODEL_ID}.pth' if cfg.teacher == 'last'
                        else f'model_epoch_{cfg.teacher}.pth')
        e = cfg.epochs
        only = self._train(f'{prefix}-only-accurate', 'train.py', roots['no-mask'], e['stage1'], a.lr, seed,
                           deps=[splits.name], outputs=[f'model_best_{MODEL_ID}.pth', teacher_file],
                           label=f'{prefix} Only Accurate (= LRB stage 1)')
        naive = self._train(f'{prefix}-naive-wrel', 'train.py', roots['all'], e['naive'], a.lr, seed,
                            deps=[splits.name], outputs=[f'model_best_{MODEL_ID}.pth'], label=f'{prefix} Naive-WREL')
        teacher = self.stage_dir(only.name) / teacher_file
        s2 = self._train(f'{prefix}-lrb-stage2', 'train_stu_base.py', roots['mask'], e['stage2'], a.stage2_lr, seed,
                         extra=['--resume', teacher], deps=[only.name],
                         outputs=[f'caption_embeddings_{MODEL_ID}.pt'], label=f'{prefix} LRB stage 2')
        bank = self.stage_dir(s2.name) / f'caption_embeddings_{MODEL_ID}.pt'
        s3 = self._train(f'{prefix}-lrb-stage3', 'train_stu_tea.py', roots['all'], e['stage3'], a.stage3_lr, seed,
                         extra=['--caption_lr', a.caption_lr, '--caption_inner_steps', a.caption_inner_steps,
                                '--caption_update_every', a.caption_update_every, '--resume', teacher,
                                '--caption_embedding_path', bank],
                         deps=[only.name, s2.name], outputs=[f'model_best_oIoU_{MODEL_ID}.pth'],
                         label=f'{prefix} LRB stage 3')
        for (method, _), step, ckpt in zip(METHODS, (only, naive, s3),
                                           (f'model_best_{MODEL_ID}.pth', f'model_best_{MODEL_ID}.pth',
                                            f'model_best_oIoU_{MODEL_ID}.pth')):
            self._tests(share, method, self.stage_dir(step.name) / ckpt, step)

    def shares(self):
        """The table's shares: 100 (--full) first, then --ratios."""
        return ([100.0] if self.cfg.args.full else []) + list(self.cfg.ratios)

    def result_files(self, share, method, split):
        """test.py's metrics JSON of a method on a split, one per training seed (in --seeds order)."""
        return list(self.results_of[(share, method, split)])

    def records_files(self, share, method, split):
        """test.py's per-sentence records of a method on a split, one file per training seed."""
        return [Path(records_path(p)) for p in self.result_files(share, method, split)]
