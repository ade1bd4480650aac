"""Following a pipeline's SLURM jobs until every step has finished: each job's state as it changes (with
its id), each training's epoch, score and ETA read from its log, a finished step's tests in the table as
they come. A step that fails (or a job that ends without finishing it: cancelled, out of requeues, a lost
node) is one line naming the step, its job and its log, and the jobs that need it are cancelled, never
left pending. Ctrl-C only detaches: the jobs run on."""
import re
import time

from utils import InputError

from . import slurm
from .manifests import read_json
from .progress import Progress, hms


class LogReader:
    """New complete lines of a growing log, fed to a Progress."""

    def __init__(self, path, progress):
        self.path, self.progress, self.offset, self.rest = path, progress, 0, b''
        if path.is_file():  # earlier attempts' lines are history
            self.offset = path.stat().st_size

    def poll(self):
        try:
            with open(self.path, 'rb') as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b'\n')
        for line in lines:
            self.progress.feed(line.decode('utf-8', 'replace'))


def _submitit_log(cfg, job_id):
    return cfg.out / 'slurm' / 'submitit' / str(job_id) / f'{job_id}_0_log.out'


def _not_requeued(cfg, job_id):
    """submitit's reason for not requeueing a job (e.g. 'timed-out too many times'), from its log."""
    try:
        text = _submitit_log(cfg, job_id).read_text(errors='replace')
    except OSError:
        return None
    found = re.findall(r'Job not requeued because: (.*?)\.?$', text, flags=re.M)
    return found[-1] if found else None


def dependents(plan, name, among):
    """The steps of `among` that need `name`, directly or through others."""
    out, frontier = set(), {name}
    while frontier:
        frontier = {s.name for s in plan.steps if s.name in among and s.name not in out
                    and any(d in frontier for d in s.deps)}
        out |= frontier
    return out


def follow(cfg, plan, jobs, say, on_step_done):
    """jobs: {step: {job_id, result_id}} of this pipeline's submitted steps. Returns when every one has
    finished; raises InputError (the first failure's line) when one did not."""
    steps = {s.name: s for s in plan.steps}
    position = {s.name: i + 1 for i, s in enumerate(plan.steps)}
    waiting = dict(jobs)
    readers = {n: LogReader(plan.logs / f'{n}.log', Progress(steps[n], say, cfg.args.progress_every))
               for n in waiting}
    states, failure = {}, None
    say(f'following {len(waiting)} SLURM job(s) every {cfg.args.poll:g} s (Ctrl-C detaches; the jobs run on)')
    while waiting:
        live = slurm.live_jobs([j['job_id'] for j in waiting.values()])
        for name in [s.name for s in plan.steps if s.name in waiting]:
            if name not in waiting:  # cancelled above as a dependent of a failed step
                continue
            job = waiting[name]
            jid, tag = job['job_id'], f'[{position[name]}/{len(plan.steps)}] {name} (job {job["job_id"]})'
            readers[name].poll()
            done = read_json(plan.stage_dir(name) / 'stage.json')
            if done and done.get('result_id') == job['result_id']:
                say(f"{tag}: done in {hms(done.get('seconds', 0))}")
                del waiting[name]
                on_step_done(steps[name])
                continue
            if jid in live:
                state, why = live[jid]
                if states.get(name) != state:  # reasons (priority, resources) change too often to print each
                    if state == 'RUNNING':
                        readers[name].progress.restart()
                    say(f'{tag}: {state.lower()}' + (f' ({why.lower()})' if state == 'PENDING' and why not in
                                                     ('None', '') and name not in states else ''))
                    states[name] = state
                continue
            del waiting[name]
            failed = read_json(plan.stage_dir(name) / 'failed.json')
            if failed and str(failed.get('job_id')) == str(jid):
                reason = f"failed (exit {failed.get('exit')}): {failed.get('line')}"
            else:
                why = _not_requeued(cfg, jid)
                reason = f"ended without finishing ({slurm.end_state(jid) or 'state unknown'}" + \
                    (f': not requeued because {why}' if why else '') + ')'

            say(f'{tag}: {reason}')
            log = plan.logs / f'{name}.log'
            submitit_log = _submitit_log(cfg, jid)
            failure = failure or (f'{name} (job {jid}) {reason}; log: {log}'
                                  + (f' (and {submitit_log})' if not failed else ''))
            stuck = dependents(plan, name, waiting)
            if stuck:
                slurm.cancel([waiting[s]['job_id'] for s in stuck])
                for s in sorted(stuck, key=position.get):
                    say(f"[{position[s]}/{len(plan.steps)}] {s} (job {waiting.pop(s)['job_id']}): cancelled, "
                        f'it needs {name}')
        if waiting:
            time.sleep(cfg.args.poll)
    if failure:
        raise InputError(f'step {failure}; run the same command again to continue (finished steps are reused)')
