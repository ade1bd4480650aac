"""Manifests: when a step is finished, and with what (stages/<step>/stage.json, started.json), compared
by command line and inputs; the JSON and git helpers they use."""
import datetime
import hashlib
import json
import shlex
import shutil
import subprocess
import uuid

from lib import files
from utils import InputError

from .config import MODEL_ID, NEUTRAL_FLAGS, REPO


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, data):
    files.write_text_atomic(path, json.dumps(data, indent=1, default=str) + '\n')


def canonical_args(args, out):
    """A step's command line as compared between runs: output paths relative to the pipeline folder, the
    flags that do not change results dropped."""
    canon, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in NEUTRAL_FLAGS:
            skip = True
            continue
        canon.append(a.replace(str(out), '$OUT'))
    return canon


def args_difference(old, new):
    """'--epochs 40 -> 20' for the first flag whose value differs (or the whole lines)."""
    def flags(line):
        d, key = {}, None
        for a in line:
            if a.startswith('-') and not _is_number(a):
                key = a
                d.setdefault(key, [])
            elif key is not None:
                d[key].append(a)
        return d
    fo, fn = flags(old), flags(new)
    for k in list(fn) + [k for k in fo if k not in fn]:
        if fo.get(k) != fn.get(k):
            show = lambda v: 'absent' if v is None else (' '.join(v) or 'set')
            return f'{k} {show(fo.get(k))} -> {show(fn.get(k))}'
    return f'{shlex.join(old)} -> {shlex.join(new)}'


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def file_digest(paths):
    h = hashlib.sha1()
    for p in paths:
        with open(p, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                h.update(chunk)
    return h.hexdigest()[:16]


class Manifests:
    """stages/<step>/stage.json (finished) and started.json (running or interrupted)."""

    def __init__(self, plan, data_digest, data_files='the refs or instances file'):
        self.plan = plan
        self.data_files = data_files
        self.out = plan.cfg.out
        self.data_digest = data_digest
        self.result_ids = {}

    def done_path(self, step):
        return self.plan.stage_dir(step.name) / 'stage.json'

    def started_path(self, step):
        return self.plan.stage_dir(step.name) / 'started.json'

    def config(self, step):
        inputs = {'data': self.data_digest}
        inputs.update({d: self.result_ids.get(d) for d in step.deps})
        return {'script': step.script, 'args': canonical_args(step.args, self.out), 'inputs': inputs}

    def refusal(self, step):
        """A finished or started step whose own command line differs, or that ran on other data (refs or
        instances changed under --refer_data_root): the one-line reason, else None. Both are refused alike:
        nothing finished is redone without being asked (--fresh)."""
        cfg = self.config(step)
        for path, state in ((self.done_path(step), 'finished'), (self.started_path(step), 'was started')):
            old = read_json(path)
            if old and old.get('config', {}).get('args') is not None:
                if (old['config'].get('script'), old['config']['args']) != (cfg['script'], cfg['args']):
                    return (f'step {step.name} in {self.plan.stage_dir(step.name)} {state} with another '
                            f"configuration ({args_difference(old['config']['args'], cfg['args'])}); pass --fresh "
                            f'to redo every step, delete that folder to redo this one, or choose another --output_dir')
                data = old['config'].get('inputs', {}).get('data')
                if data is not None and data != self.data_digest:
                    return (f'step {step.name} in {self.plan.stage_dir(step.name)} {state} on other data: '
                            f'{self.data_files} changed since (digest {data} -> {self.data_digest}); pass --fresh '
                            f'to redo every step on the new data, or choose another --output_dir')
        return None

    def decide(self, step):
        """-> ('reuse' | 'continue' | 'run', reason)."""
        cfg = self.config(step)
        done = read_json(self.done_path(step))
        if done and done.get('config') == cfg:
            missing = [o for o in step.outputs if not o.exists()]
            if not missing:
                self.result_ids[step.name] = done['result_id']
                return 'reuse', f"finished {done.get('finished', '')}"
            return 'run', f'{missing[0].name} is missing'
        reason = 'inputs changed' if done else ''
        started = read_json(self.started_path(step))
        last = self.plan.stage_dir(step.name) / f'model_last_{MODEL_ID}.pth'
        if step.resumable and started and started.get('config') == cfg and last.is_file():
            return 'continue', f'from {last.name}'
        if started and started.get('config') != cfg:
            reason = 'inputs changed'
        return 'run', reason

    def begin(self, step, mode):
        """Before a step runs (or is submitted): 'run' empties its folder; started.json records its
        configuration and the result id its finished manifest will carry, so that the steps depending on it
        can be judged (and submitted) before it finishes. -> the result id."""
        d = self.plan.stage_dir(step.name)
        started = read_json(self.started_path(step)) or {}
        if mode == 'run':  # the pipeline owns this folder: start clean
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            started = {}
        rid = started.get('result_id') or uuid.uuid4().hex
        write_json(self.started_path(step), {'step': step.name, 'config': started.get('config') or self.config(step),
                                             'started': started.get('started') or now(), 'result_id': rid})
        self.result_ids[step.name] = rid
        return rid

    def finish(self, step, command, seconds):
        finish_step(self.plan.stage_dir(step.name), step, command, seconds, self.plan.logs / f'{step.name}.log')


def finish_step(stage_dir, step, command, seconds, log):
    """A step exited 0: its manifest (stage.json), from started.json, once every output is there; else one
    line naming the missing file. Run by reproduce.py (local) or by the step's own SLURM job."""
    missing = [o for o in step.outputs if not o.exists()]
    if missing:
        raise InputError(f'step {step.name} exited normally but did not write {missing[0]}; see {log}')
    started = read_json(stage_dir / 'started.json')
    if not started or 'config' not in started:
        raise InputError(f'step {step.name}: {stage_dir / "started.json"} is missing or unreadable')
    write_json(stage_dir / 'stage.json', {'step': step.name, 'config': started['config'], 'command': command,
                                          'outputs': [str(o) for o in step.outputs], 'finished': now(),
                                          'seconds': round(seconds, 1),
                                          'result_id': started.get('result_id') or uuid.uuid4().hex,
                                          'git': git_info()})
    with_suppress(lambda: (stage_dir / 'started.json').unlink())


def with_suppress(fn):
    try:
        fn()
    except OSError:
        pass


def now():
    return datetime.datetime.now().isoformat(timespec='seconds')


def git_info():
    def git(*cmd):
        r = subprocess.run(['git', '--no-optional-locks', '-C', str(REPO), *cmd], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git('rev-parse', 'HEAD')
    status = git('status', '--porcelain', '--untracked-files=no')
    return {'commit': commit, 'dirty': bool(status) if status is not None else None}
