"""Step locks (locks/<step>.lock in the pipeline folder): two pipelines never train into the same step
folder at once. A lock names its holder: a reproduce.py process (host, PID, start time, and the step's own
process, which may outlive a killed pipeline for a moment) or a SLURM job (its id). A holder that is gone
(a dead PID on this host, a job SLURM no longer lists) holds nothing, so a killed pipeline or job never
blocks the next one; a live one is refused in one line naming it."""
import os
import socket

from utils import InputError

from .manifests import now, read_json, with_suppress, write_json

HOST = socket.gethostname()


def proc_stat(pid):
    """/proc/<pid>/stat's fields after the command name ([0] the state, [19] the start time), or None."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None


def _start_time(pid):
    """The process's start time in clock ticks since boot, so a reused PID is not taken for it."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 and fields[19].isdigit() else None


def this_process():
    return {'host': HOST, 'pid': os.getpid(), 'pid_start': _start_time(os.getpid()), 'since': now()}


def child(pid):
    """A lock's record of the step's own process: it may outlive a killed pipeline for a moment."""
    return {'child_pid': pid, 'child_start': _start_time(pid)}


def process_alive(holder):
    """True/False for a process on this host; None when it is on another host (cannot be told from here)."""
    if holder.get('host') != HOST:
        return None
    pid = holder.get('pid')
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError):
        return True if isinstance(pid, int) else False
    fields = proc_stat(pid)
    if fields and fields[0] in ('Z', 'X'):  # exited, not yet reaped (an orphan waits for init)
        return False
    return holder.get('pid_start') is None or _start_time(pid) == holder.get('pid_start')


def describe(holder):
    if holder.get('job_id'):
        return f"SLURM job {holder['job_id']}"
    return f"PID {holder.get('pid')} on host {holder.get('host')}"


class StepLocks:
    def __init__(self, out, live_jobs=None):
        """live_jobs(job ids) -> the subset SLURM still lists (pending, running, requeued); None: no SLURM here."""
        self.dir = out / 'locks'
        self.live_jobs = live_jobs

    def path(self, name):
        return self.dir / f'{name}.lock'

    def holder(self, name):
        """The live holder of a step's lock, or None."""
        lock = read_json(self.path(name))
        if not lock:
            return None
        if lock.get('job_id'):
            if self.live_jobs is None:
                return lock  # a job lock, and no SLURM here to ask: assume it runs
            return lock if str(lock['job_id']) in self.live_jobs([str(lock['job_id'])]) else None
        if lock.get('pid') == os.getpid() and lock.get('host') == HOST:
            return None  # this pipeline's own
        if process_alive(lock) is not False:
            return lock
        step_process = {'host': lock.get('host'), 'pid': lock.get('child_pid'), 'pid_start': lock.get('child_start')}
        if lock.get('child_pid') and process_alive(step_process):  # the pipeline is gone, its step still exits
            return {**lock, **step_process}
        return None

    def check(self, names):
        """One line for the first step held by someone else alive."""
        for name in names:
            lock = self.holder(name)
            if lock is not None:
                where = '' if lock.get('host') in (None, HOST) or lock.get('job_id') else \
                    f' (another host: delete {self.path(name)} if that process is gone)'
                raise InputError(f'step {name} is in use by {describe(lock)}{where}, since {lock.get("since")}: '
                                 f'another reproduce.py works in {self.dir.parent}; wait for it or stop it'
                                 + (' (reproduce.py ... --cancel)' if lock.get('job_id') else ''))

    def take(self, name, holder):
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.path(name), {'step': name, **holder})

    def release(self, name):
        with_suppress(lambda: self.path(name).unlink())

    def held(self):
        return sorted(p.stem for p in self.dir.glob('*.lock')) if self.dir.is_dir() else []
