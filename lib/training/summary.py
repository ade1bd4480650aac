"""TensorBoard logging of a training run: a writer on rank 0 whose folder appears only at the first
write, and whose write errors are one line naming the log folder.

TensorBoard writes from a thread of its own; an OSError there (a folder gone, read-only or full) is kept by
the thread and raised by the next call in the main thread, which makes it our one line. The thread would
also print its traceback first: `_quiet_writer_threads` drops that print (for TensorBoard's writer thread
and OSError only), and `close` flushes first, so that an error in the last writes is not lost."""
import os
import threading

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
                _quiet_writer_threads()
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
            try:
                self._writer.flush()  # raises what the writer thread met: close() itself would not
                self._writer.close()
            except OSError as e:
                raise write_error(self.log_dir, e) from None


def _quiet_writer_threads():
    """Leave TensorBoard's writer-thread OSErrors to the main thread's next call (no traceback); idempotent."""
    previous = threading.excepthook
    if getattr(previous, 'lrb_quiet_tensorboard', False):
        return

    def hook(args):
        thread = type(args.thread)
        if not (thread.__name__ == '_AsyncWriterThread' and thread.__module__.startswith('tensorboard')
                and isinstance(args.exc_value, OSError)):
            previous(args)
    hook.lrb_quiet_tensorboard = True
    threading.excepthook = hook


def make_writer(output_dir, model_id, fresh=False):
    """TensorBoard writer on rank 0 (None elsewhere), created lazily (see LazySummaryWriter)."""
    if not distributed.is_main_process():
        return None
    return LazySummaryWriter(os.path.join(output_dir, f'tb_{model_id}'), fresh=fresh)
