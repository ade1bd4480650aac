"""What a step's SLURM job runs (StepJob, submitted through submitit): the step's script in each of the job's
tasks, with torch.distributed's environment from SLURM's (rank, world, master = the first node), its output
appended to the step's log; rank 0 writes the step's manifest when it succeeds, or failed.json with the
script's one line when it fails. Before the time limit, or when preempted, SLURM signals the job: submitit
calls checkpoint(), which stops the script (its checkpoints are written atomically) and requeues the same
StepJob; a new attempt continues from the step's model_last_<id>.pth with --resume."""
import os
import signal
import subprocess
import time

from .locks import proc_stat
from .manifests import finish_step, now, with_suppress, write_json
from .runner import _LIBC, die_with_parent, failure_line, replace_flag

STOP_GRACE = 60  # seconds a script gets to stop after SIGTERM before it is killed


def _child_setup():
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the job's stop signal is for submitit's handler, not the script
    if _LIBC is not None:
        die_with_parent()


class StepFailed(Exception):
    pass


class StepJob:
    def __init__(self, step, command, env, log, stage_dir):
        self.step, self.command, self.env, self.log, self.stage_dir = step, command, env, log, stage_dir
        self.proc = None
        self.terminated = False

    def __getstate__(self):  # pickled by submitit: never the running process
        return {k: v for k, v in self.__dict__.items() if k not in ('proc', 'terminated')}

    def __setstate__(self, state):
        self.__dict__.update(state, proc=None, terminated=False)

    def model_last(self):
        from .config import MODEL_ID
        return self.stage_dir / f'model_last_{MODEL_ID}.pth'

    def environment(self, job):
        env = dict(self.env)
        cpus = os.environ.get('SLURM_CPUS_PER_TASK')
        if cpus:
            env['OMP_NUM_THREADS'] = cpus
        if job.num_tasks > 1:  # the scripts read torch.distributed's env:// variables, as torchrun sets them
            env.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank),
                       LOCAL_WORLD_SIZE=str(job.num_tasks // max(1, job.num_nodes)), MASTER_ADDR=job.hostnames[0],
                       MASTER_PORT=str(20000 + int(str(job.job_id).split('_')[0]) % 20000))
        return env

    def arguments(self):
        args = list(self.step.args)
        if self.step.resumable and self.model_last().is_file():  # an earlier attempt of this job got this far
            args = replace_flag(args, '--resume', str(self.model_last()))
        return args

    def __call__(self):
        import submitit
        job = submitit.JobEnvironment()
        rank = job.global_rank
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)  # scancel: the script stops by itself
        cmd = self.command + self.arguments()
        log = self.log if rank == 0 else self.log.with_name(f'{self.step.name}.rank{rank}.log')
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with open(log, 'a') as out:
            attempt = int(os.environ.get('SLURM_RESTART_COUNT', '0')) + 1
            out.write(f'\n===== {now()} SLURM job {job.job_id}, attempt {attempt}, task {rank}/{job.num_tasks} '
                      f'on {job.hostname}: {subprocess.list2cmdline(cmd)}\n')
            out.flush()
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.environment(job),
                                         preexec_fn=_child_setup)
            rc = self.proc.wait()
        signal.signal(signal.SIGTERM, previous)
        if rc != 0:
            line = 'terminated (SIGTERM: cancelled or preempted)' if self.terminated else failure_line(_tail(log))
            if rank == 0 and not self.terminated:
                write_json(self.stage_dir / 'failed.json', {'step': self.step.name, 'job_id': str(job.job_id),
                                                            'exit': rc, 'line': line, 'log': str(log), 'at': now()})
            raise StepFailed(f'{self.step.name} failed (exit {rc}): {line}; log: {log}')
        if rank == 0:
            finish_step(self.stage_dir, self.step, cmd, time.time() - start, log)
        return 'done'

    def _on_sigterm(self, signum, frame):
        self.terminated = True

    def checkpoint(self):
        """submitit, on the stop signal before the time limit or a preemption: stop the script, requeue."""
        import submitit
        if self.proc is not None and self.proc.returncode is None:
            # this runs in a signal handler that interrupted self.proc.wait(): Popen's own wait would deadlock
            # on its lock, so wait for the exit through /proc and leave the reaping to the interrupted wait
            with_suppress(self.proc.terminate)
            if not _exited(self.proc.pid, STOP_GRACE):
                with_suppress(self.proc.kill)
                _exited(self.proc.pid, 10)
        with open(self.log, 'a') as out:
            out.write(f'===== {now()} stopped for a requeue (time limit or preemption); the next attempt '
                      f'continues from {self.model_last().name if self.step.resumable else "the start"}\n')
        return submitit.helpers.DelayedSubmission(StepJob(self.step, self.command, self.env, self.log,
                                                          self.stage_dir))


def _exited(pid, seconds):
    """Whether the child `pid` ended (a zombie or gone) within `seconds`, without reaping it."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        fields = proc_stat(pid)
        if not fields or fields[0] in ('Z', 'X'):
            return True
        time.sleep(0.2)
    return False


def _tail(path, lines=20):
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode('utf-8', 'replace')
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()][-lines:]
