"""Progress lines: timestamped printing (Printer) and what a step's output says about its epoch, its
validation score and its ETA (Progress)."""
import datetime
import re
import threading
import time


class Printer:
    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, text):
        with self.lock:
            print(f'{time.strftime("%H:%M:%S")} {text}', flush=True)


def hms(seconds):
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


class Progress:
    """Reads a step's output lines; prints which epoch it is in, the validation score and the ETA."""
    ITER = re.compile(r'Epoch: \[(\d+)\] \[(\d+)/(\d+)\].*?eta: (\d+:\d\d:\d\d)')
    EPOCH = re.compile(r'Epoch (\d+): train loss \S+, (\d+)s \(([^)]*)\)')
    RESUMED = re.compile(r'continuing at epoch (\d+)')
    OIOU = re.compile(r'overall IoU = ([\d.]+)')
    MIOU = re.compile(r'Mean IoU is ([\d.]+)')

    def __init__(self, step, say, every):
        self.step, self.say, self.every = step, say, every
        self.start = time.time()
        self.first_epoch = 0
        self.epochs_done = 0
        self.pending_epoch = None
        self.miou = None
        self.last_said = time.time()
        self.epoch_start = time.time()

    def restart(self):
        """The step starts now (a SLURM job leaving the queue): ETAs count from here."""
        self.start = self.last_said = self.epoch_start = time.time()
        self.epochs_done = 0

    def feed(self, line):
        m = self.RESUMED.search(line)
        if m:
            self.first_epoch = int(m.group(1))
            return
        m = self.MIOU.search(line)
        if m:
            self.miou = float(m.group(1))
            return
        m = self.EPOCH.search(line)
        if m:
            self.pending_epoch = (int(m.group(1)), m.group(3))
            return
        m = self.OIOU.search(line)
        if m:
            oiou = float(m.group(1))
            if self.pending_epoch is not None:
                self.epoch_finished(*self.pending_epoch, oiou)
                self.pending_epoch = None
            elif self.step.kind == 'test':
                self.say(f'{self.step.name}: oIoU {oiou:.2f}, mIoU {self.miou or 0:.2f}')
            return
        m = self.ITER.search(line)
        if m and time.time() - self.last_said >= self.every and self.step.epochs:
            epoch, i, n, eta = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
            self.last_said = time.time()
            self.say(f'{self.step.name}: epoch {epoch + 1}/{self.step.epochs}, iteration {i}/{n}, '
                     f'epoch eta {eta}, step eta {hms(self.eta(epoch, i, n))}')

    def eta(self, epoch, i=None, n=None):
        remaining = self.step.epochs - epoch - 1
        if self.epochs_done:
            per_epoch = (time.time() - self.start) / self.epochs_done
            return per_epoch * (remaining + 1 - (i / n if i else 1))
        if i:  # inside the first epoch: scale its elapsed time
            per_epoch = (time.time() - self.start) / (i / n)
            return per_epoch * (remaining + 1 - i / n)
        return 0

    def epoch_finished(self, epoch, desc, oiou):
        self.epochs_done += 1
        self.last_said = time.time()
        per_epoch = (time.time() - self.start) / self.epochs_done
        eta = per_epoch * (self.step.epochs - epoch - 1)
        self.say(f'{self.step.name}: epoch {epoch + 1}/{self.step.epochs} done, {desc} oIoU {oiou:.2f} '
                 f'mIoU {self.miou or 0:.2f}, {per_epoch:.0f} s/epoch, step eta {hms(eta)}')
