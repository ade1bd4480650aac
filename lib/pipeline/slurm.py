"""SLURM, through submitit: the checks before anything is submitted (check_cluster, check_time_limit), one
executor per step (executor), the plan submitted at once with afterok dependencies (submit_plan), and the
jobs' states (live_jobs, end_state) and cancellation (cancel). sacct is used when the cluster keeps
accounting; squeue and scontrol otherwise."""
import importlib.util
import re
import shutil
import subprocess

from utils import InputError

from .config import REPO
from .job import StepJob
from .manifests import now, read_json
from .progress import Progress

LIVE = {'PENDING', 'CONFIGURING', 'RUNNING', 'COMPLETING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'RESIZING',
        'SUSPENDED', 'STOPPED', 'SIGNALING', 'STAGE_OUT', 'RESV_DEL_HOLD', 'SPECIAL_EXIT'}


def _run(cmd, timeout=60):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(cmd, 1, '', str(e))


def _first_line(text):
    return next((line.strip() for line in text.splitlines() if line.strip()), 'no output')


def check_cluster(cfg):
    """One line, before anything is submitted: no SLURM here, submitit missing, the controller not
    answering, an unknown partition."""
    for tool in ('sbatch', 'squeue', 'scancel', 'sinfo'):
        if shutil.which(tool) is None:
            raise InputError(f'--launcher slurm: no {tool} on this machine (SLURM is not installed here or not on '
                             f'PATH); run reproduce.py on the cluster\'s login node, or use --launcher local')
    if importlib.util.find_spec('submitit') is None:
        raise InputError('--launcher slurm needs submitit: pip install submitit') from None
    info = _run(['sinfo', '-h', '-o', '%P'])
    if info.returncode != 0:
        raise InputError(f'--launcher slurm: sinfo failed, SLURM does not answer: {_first_line(info.stderr)}')
    partitions = [p.rstrip('*') for p in info.stdout.split()]
    part = cfg.args.slurm_partition
    if part and part not in partitions:
        raise InputError(f"--slurm_partition {part}: SLURM has no such partition (it has: {', '.join(partitions)})")


SIGNAL_EARLY = 30  # slurmctld looks at time limits every 30 s, so the stop signal may come that much early


def check_time_limit(cfg, plan):
    """A job must have time to train before SLURM tells it to stop: --slurm_signal_delay (+ the controller's
    30 s) within --slurm_time, and --slurm_time above one epoch of a training as measured by an earlier
    attempt in this folder's logs (the epoch lines of train.py), else every attempt would be stopped
    before its first checkpoint."""
    a = cfg.args
    budget = a.slurm_time * 60 - a.slurm_signal_delay - SIGNAL_EARLY
    if budget <= 0:
        raise InputError(f'--slurm_signal_delay {a.slurm_signal_delay}: with --slurm_time {a.slurm_time} (minutes) '
                         f'SLURM may signal the job to stop as soon as it starts (it signals up to {SIGNAL_EARLY} s '
                         f'early); give a longer --slurm_time or a delay below {a.slurm_time * 60 - SIGNAL_EARLY} s')
    for step in plan.steps:
        log = plan.logs / f'{step.name}.log'
        if step.kind != 'train' or not log.is_file():
            continue
        with open(log, errors='replace') as f:
            seconds = [int(m.group(2)) for m in Progress.EPOCH.finditer(f.read())]
        if seconds and max(seconds) > budget:
            raise InputError(f'--slurm_time {a.slurm_time}: one epoch of {step.name} took {max(seconds)} s '
                             f'({log}), more than the {budget} s a job is sure to have before it is told to stop '
                             f'(--slurm_signal_delay {a.slurm_signal_delay} + {SIGNAL_EARLY} s); it could never '
                             f'write a checkpoint')


def sbatch_options(text_flags):
    """--slurm_args ('--constraint=a100 --exclude n7 --exclusive') -> submitit's additional parameters."""
    out, i = {}, 0
    while i < len(text_flags):
        flag = text_flags[i]
        if not flag.startswith('--') or len(flag) < 3:
            raise InputError(f"--slurm_args: {flag!r} is not a long sbatch option (--name=value or --name value)")
        name, eq, value = flag[2:].partition('=')
        if not eq:
            nxt = text_flags[i + 1] if i + 1 < len(text_flags) else None
            if nxt is not None and not nxt.startswith('--'):
                value, i = nxt, i + 1
            else:
                value = True
        out[name.replace('-', '_')] = value
        i += 1
    return out


def executor(cfg, step, dependencies):
    import submitit
    a = cfg.args
    distributed = step.distributed and cfg.world > 1
    nodes, tasks = (cfg.nodes, a.nproc_per_node) if distributed else (1, 1)
    gpus = a.nproc_per_node if (cfg.device == 'cuda' and step.kind != 'splits') else None
    ex = submitit.SlurmExecutor(folder=str(cfg.out / 'slurm' / 'submitit' / '%j'),
                                max_num_timeout=a.slurm_max_requeues)
    params = dict(job_name=f'repro-{step.name}', time=a.slurm_time, nodes=nodes, ntasks_per_node=tasks,
                  cpus_per_task=a.slurm_cpus_per_task or (a.workers + 1), signal_delay_s=a.slurm_signal_delay,
                  stderr_to_stdout=True,
                  additional_parameters={'kill_on_invalid_dep': 'yes', **sbatch_options(cfg.slurm_extra)})
    for key, value in (('partition', a.slurm_partition), ('account', a.slurm_account), ('qos', a.slurm_qos),
                       ('mem', a.slurm_mem), ('gpus_per_node', gpus),
                       ('dependency', 'afterok:' + ':'.join(dependencies) if dependencies else None)):
        if value:
            params[key] = value
    ex.update_parameters(**params)
    return ex


def submit_plan(cfg, plan, manifests, locks, env, say):
    """Every step not finished, submitted at once in plan order; a step's job waits (afterok) for the jobs
    of the steps it needs that were submitted too. -> {step: {job_id, result_id}}. A refused submission
    cancels what was submitted and is one line."""
    jobs = {}
    total = len(plan.steps)
    try:
        for i, step in enumerate(plan.steps, 1):
            mode, reason = manifests.decide(step)
            tag = f'[{i}/{total}] {step.name}'
            if mode == 'reuse':
                say(f'{tag}: reused ({reason})')
                continue
            rid = manifests.begin(step, mode)  # main checked every step's lock before submitting
            deps = [jobs[d]['job_id'] for d in step.deps if d in jobs]
            job = _submit(cfg, step, deps, plan, env)
            jobs[step.name] = {'job_id': job.job_id, 'result_id': rid, 'submitted': now()}
            locks.take(step.name, {'job_id': job.job_id, 'since': now()})
            what = {'continue': f'continues {reason}', 'run': 'runs' + (f' ({reason})' if reason else '')}[mode]
            after = f" after job{'s' if len(deps) > 1 else ''} {', '.join(deps)}" if deps else ''
            say(f'{tag}: job {job.job_id}{after}: {what}: {step.script}; log {plan.logs / (step.name + ".log")}')
    except BaseException:
        cancel([j['job_id'] for j in jobs.values()])
        for name in jobs:
            locks.release(name)
        raise
    return jobs


def _submit(cfg, step, deps, plan, env):
    ex = executor(cfg, step, deps)
    work = StepJob(step, [cfg.python, str(REPO / step.script)], env, plan.logs / f'{step.name}.log',
                   plan.stage_dir(step.name))
    try:
        return ex.submit(work)
    except Exception as e:  # sbatch refused: its own words
        text = str(e)
        m = re.search(r'sbatch: error: (.*)', text)
        raise InputError(f'--launcher slurm: sbatch refused step {step.name}: '
                         f'{m.group(1).strip() if m else _first_line(text)}') from None


def live_jobs(ids):
    """{job id: (state, reason)} of the given jobs that SLURM still lists (pending, running, requeued...)."""
    ids = [str(i) for i in ids]
    if not ids:
        return {}
    r = _run(['squeue', '-h', '-o', '%i|%T|%r', '-j', ','.join(ids)])
    if r.returncode != 0:  # an id SLURM has forgotten makes the whole call fail: ask one by one
        if len(ids) == 1:
            return {}
        out = {}
        for i in ids:
            out.update(live_jobs([i]))
        return out
    out = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split('|')
        if len(parts) == 3 and parts[0] in ids and parts[1] in LIVE:
            out[parts[0]] = (parts[1], parts[2])
    return out


def end_state(job_id):
    """How an ended job ended (COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ...), from sacct, else from
    scontrol while the controller remembers it; None when neither knows."""
    r = _run(['sacct', '-n', '-P', '-X', '-o', 'State', '-j', str(job_id)])
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.split()[0].split()[0]
    r = _run(['scontrol', 'show', 'job', '-o', str(job_id)])
    m = re.search(r'JobState=(\S+)', r.stdout) if r.returncode == 0 else None
    return m.group(1) if m else None


def cancel(ids):
    ids = [str(i) for i in ids]
    if ids:
        _run(['scancel', *ids])


def record_path(cfg):
    return cfg.out / 'slurm' / 'jobs.json'


def read_record(cfg):
    """{step: {job_id, result_id, submitted}} of the pipeline's last submission."""
    return (read_json(record_path(cfg)) or {}).get('steps', {})
