"""Running steps: each script in a subprocess (plain python or torchrun) with its log file (Runner), and
the plan's steps in order, up to --jobs at once (execute)."""
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

from utils import InputError

from .config import MODEL_ID, REPO
from .locks import child, this_process
from .manifests import now, with_suppress
from .progress import Progress, hms


def python_env(cfg):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    if cfg.device == 'cpu' and 'OMP_NUM_THREADS' not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        env['OMP_NUM_THREADS'] = str(max(1, cores // (cfg.args.jobs * cfg.args.nproc_per_node)))
    return env


def _libc():
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith('linux') else None
    except (OSError, ImportError):
        return None


_LIBC = _libc()  # loaded here: between fork and exec a child may not import (another thread may hold the lock)


def die_with_parent():
    """preexec_fn of every step (Linux): the kernel sends the step SIGTERM when reproduce.py dies, even by
    SIGKILL, so no trainer runs on as an orphan (SIGTERM: a script exits with its one line, torchrun stops
    its workers). Elsewhere nothing is done."""
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def launcher(cfg, step):
    a = cfg.args
    script = str(REPO / step.script)
    if not step.distributed or cfg.world == 1:
        return [sys.executable, script]
    # --standalone: a free port per step, so steps never collide
    return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={a.nproc_per_node}', '--standalone',
            *cfg.torchrun_extra, script]


class StepFailed(Exception):
    pass


class Runner:
    """Runs steps as subprocesses, each with its log file; several at once with --jobs."""

    def __init__(self, cfg, plan, say, on_start=None):
        """on_start(step, proc): called once a step's process runs (e.g. to name it in the step's lock)."""
        self.cfg, self.plan, self.say, self.on_start = cfg, plan, say, on_start
        self.procs = {}
        self.lock = threading.Lock()
        self.env = python_env(cfg)

    def command(self, step, args):
        return launcher(self.cfg, step) + args

    def log_path(self, step):
        return self.plan.logs / f'{step.name}.log'

    def run(self, step, args):
        """Run and wait; raises StepFailed with a one-line reason. -> the command line."""
        cmd = self.command(step, args)
        log_path = self.log_path(step)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        progress = Progress(step, self.say, self.cfg.args.progress_every)
        tail = []
        with open(log_path, 'a') as log:
            log.write(f'\n===== {now()} {shlex.join(cmd)}\n')
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    errors='replace', env=self.env,
                                    preexec_fn=die_with_parent if _LIBC is not None else None)
            with self.lock:
                self.procs[step.name] = proc
            if self.on_start is not None:
                self.on_start(step, proc)
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if line.strip():
                        tail = (tail + [line.strip()])[-20:]
                    progress.feed(line)
                rc = proc.wait()
            finally:
                with self.lock:
                    self.procs.pop(step.name, None)
        if rc != 0:
            raise StepFailed(f'{step.name} failed (exit {rc}): {failure_line(tail)}; log: {log_path}')
        return cmd

    def interrupt_all(self, grace=0.0):
        """Stop the running steps: SIGINT first (they exit as after Ctrl-C; every checkpoint is written
        atomically, so the last one stays whole), then SIGTERM and SIGKILL for a step that ignores it (a
        shell's background job ignores SIGINT). `grace`: seconds to let them exit on their own first
        (a terminal's Ctrl-C reached them already)."""
        with self.lock:
            procs = list(self.procs.values())

        def wait(alive, seconds):
            deadline = time.time() + seconds
            for p in alive:
                try:
                    p.wait(timeout=max(0.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    pass

        wait(procs, grace)
        for sig, seconds in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                return
            for p in alive:
                with_suppress(lambda: p.send_signal(sig))
            wait(alive, seconds)


def failure_line(tail):
    """The most telling line of a failed step's output: its one-line error, else the exception's line."""
    for line in reversed(tail):
        if ': error: ' in line or re.match(r'^[\w.]*(Error|Exception)\b', line):
            return line[:300]
    return (tail[-1][:300] if tail else 'no output')


def execute(cfg, plan, manifests, say, on_step_done, locks):
    """Run the plan's steps in order (up to --jobs at once when their inputs are ready), each under this
    process's lock (locks.StepLocks)."""
    holder = this_process()
    runner = Runner(cfg, plan, say, on_start=lambda step, proc: locks.take(step.name, {**holder, **child(proc.pid)}))
    pending = list(plan.steps)
    finished = set()
    results = queue.Queue()
    running = {}
    failure = None
    total = len(plan.steps)
    position = {s.name: i + 1 for i, s in enumerate(plan.steps)}

    def work(step, args):
        t0 = time.time()
        try:
            cmd = runner.run(step, args)
            results.put((step, cmd, time.time() - t0, None))
        except StepFailed as e:
            results.put((step, None, 0, str(e)))
        except Exception as e:  # noqa: BLE001 - reported as the step's failure
            results.put((step, None, 0, f'{step.name} failed: {type(e).__name__}: {e}'))

    try:
        while pending or running:
            while failure is None and len(running) < cfg.args.jobs:
                ready = next((s for s in pending if all(d in finished for d in s.deps)), None)
                if ready is None:
                    break
                pending.remove(ready)
                mode, reason = manifests.decide(ready)
                tag = f'[{position[ready.name]}/{total}] {ready.name}'
                if mode == 'reuse':
                    say(f'{tag}: reused ({reason})')
                    finished.add(ready.name)
                    on_step_done(ready)
                    continue
                args = list(ready.args)
                if mode == 'continue':
                    args = replace_flag(args, '--resume', str(plan.stage_dir(ready.name) / f'model_last_{MODEL_ID}.pth'))
                locks.check([ready.name])
                locks.take(ready.name, holder)
                manifests.begin(ready, mode)
                what = {'continue': f'continuing {reason}', 'run': 'running' + (f' ({reason})' if reason else '')}[mode]
                epochs = f', {ready.epochs} epochs' if ready.epochs else ''
                say(f'{tag}: {what}: {ready.script}{epochs}; log {runner.log_path(ready)}')
                t = threading.Thread(target=work, args=(ready, args), daemon=True)
                running[ready.name] = t
                t.start()
            if not running:
                if failure is not None or not pending:
                    break
                raise InputError(f'steps {", ".join(s.name for s in pending)} wait for inputs that never come')
            step, cmd, seconds, error = results.get()
            running.pop(step.name)
            locks.release(step.name)
            if error is not None:
                if failure is None:
                    failure = error
                    if running:
                        say(f'stopping {", ".join(running)} (they continue from their last checkpoint next time)')
                        runner.interrupt_all()
                continue
            try:
                manifests.finish(step, cmd, seconds)
            except InputError as e:  # it exited 0 but its files are not there
                if failure is None:
                    failure = str(e)[len('step '):]
                    runner.interrupt_all()
                continue
            say(f'[{position[step.name]}/{total}] {step.name}: done in {hms(seconds)}')
            finished.add(step.name)
            on_step_done(step)
    except KeyboardInterrupt:
        runner.interrupt_all(grace=10)
        print('\nreproduce.py: interrupted; run the same command again to continue (finished steps are reused, '
              'an interrupted training continues from its last checkpoint)', file=sys.stderr, flush=True)
        sys.exit(130)
    except BaseException:  # no step outlives the pipeline
        runner.interrupt_all()
        raise
    if failure is not None:
        raise InputError(f'step {failure}')


def replace_flag(args, flag, value):
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out
