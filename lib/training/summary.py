"""TensorBoard logging of a training run: a writer on rank 0 whose folder appears only at the first
write, and whose write errors are one line naming the log folder."""
import os

from lib.files import write_error

from . import distributed


class LazySummaryWriter:
    """A TensorBoard SummaryWriter that creates its folder at the first write, so a run that fails
    before its first step leaves no empty log folder. `fresh`: drop the event files an earlier run
    left there first (train.py --overwrite)."""

    def __init__(self, log_dir, fresh=False):
        self.log_dir, self.fresh, self._writer = log_dir, fresh, None

    def _get(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            try:
                if self.fresh and os.path.isdir(self.log_dir):
                    for name in os.listdir(self.log_dir):
                        if name.startswith('events.out.tfevents.'):
                            os.unlink(os.path.join(self.log_dir, name))
                self._writer = SummaryWriter(log_dir=self.log_dir)
            except OSError as e:
                raise write_error(self.log_dir, e) from None
        return self._writer

    def __getattr__(self, name):  # add_scalar, flush, ...: only what is not defined here
        attr = getattr(self._get(), name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):  # a full disk: one line naming the log folder
            try:
                return attr(*args, **kwargs)
            except OSError as e:
                raise write_error(self.log_dir, e) from None
        return call

    def close(self):
        if self._writer is not None:
            self._writer.close()


def make_writer(output_dir, model_id, fresh=False):
    """TensorBoard writer on rank 0 (None elsewhere), created lazily (see LazySummaryWriter)."""
    if not distributed.is_main_process():
        return None
    return LazySummaryWriter(os.path.join(output_dir, f'tb_{model_id}'), fresh=fresh)
