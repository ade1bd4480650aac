"""The repository's scripts (train.py, test.py, the LRB stages, predict.py) run by the tests as processes of their
own, without paying for Python's imports each time: most of a failing or tiny run's 5-10 s is importing torch,
transformers and the model code. A server process (one per test process, started at its first use) imports
what the scripts import, once; each run is a fork of it that becomes the script: its own process and PID,
the request's environment, working directory, argv and sys.path, stdin from /dev/null, stdout and stderr to
files, the script executed as __main__ (runpy), the interpreter's own exit (exit code, traceback and exit 1,
SIGINT for an escaping KeyboardInterrupt, atexit handlers, threads joined). A `sitecustomize.py` on the
request's PYTHONPATH (the tests' hooks) is imported first, as Python's startup would; the repository's own
modules are not kept in the server, so each run imports them after its hook, from the files as they are.

What a fork does not redo: the interpreter's start-up and the third-party imports' own work, so a warning
printed while importing torch or transformers is not in the run's stderr. Runs fall back to a plain subprocess when their
environment differs from the server's in anything but PYTHONPATH, CUDA_VISIBLE_DEVICES and the tests' own
variables, for other programs, for torchrun, or with LRB_TESTS_NO_FORK=1 in the environment.

run(cmd, ...) and popen(cmd, ...) take the same arguments as subprocess.run / subprocess.Popen (the subset the
tests use) and return a CompletedProcess / a Popen-like object."""
import ast
import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVED = ('train.py', 'test.py', 'train_stu_base.py', 'train_stu_tea.py', 'predict.py')
# read when a run needs them (not while importing), so a run may set them to anything
RUNTIME_ENV = ('PYTHONPATH', 'CUDA_VISIBLE_DEVICES', 'PYTEST_CURRENT_TEST')
RUNTIME_ENV_PREFIXES = ('LRB_TEST_',)


def _relevant(env):
    return {k: v for k, v in env.items() if k not in RUNTIME_ENV and not k.startswith(RUNTIME_ENV_PREFIXES)}


# --- the client (in the test process) --------------------------------------------------------------------------

class _Server:
    def __init__(self, env):
        self.env = {k: v for k, v in env.items() if k != 'PYTHONPATH' and not k.startswith(RUNTIME_ENV_PREFIXES)}
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(req_r), str(rep_w)],
                                     pass_fds=(req_r, rep_w), cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(req_r)
        os.close(rep_w)
        self.lock = threading.Lock()
        self.buffer = b''
        self.replies = {}  # request id -> {'pid': ...} then {'status': ...}
        self.next_id = 0
        self.folder = Path(tempfile.mkdtemp(prefix='script_server_'))

    def serves(self, env):
        return self.proc.poll() is None and _relevant(env) == _relevant(self.env)

    def submit(self, request):
        with self.lock:
            self.next_id += 1
            request = dict(request, id=self.next_id)
            os.write(self.req_w, (json.dumps(request) + '\n').encode())
            return self.next_id

    def reply(self, rid, key, timeout):
        """The reply `key` ('pid' or 'status') to request `rid`, within `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while key not in self.replies.get(rid, {}):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if left == 0.0 or not select.select([self.rep_r], [], [], left)[0]:
                    raise subprocess.TimeoutExpired('script server', timeout)
                data = os.read(self.rep_r, 65536)
                if not data:
                    raise RuntimeError('the script server ended')
                self.buffer += data
                *lines, self.buffer = self.buffer.split(b'\n')
                for line in lines:
                    message = json.loads(line)
                    self.replies.setdefault(message.pop('id'), {}).update(message)
            return self.replies[rid][key]

    def close(self):
        try:
            os.close(self.req_w)  # the server finishes its runs and exits
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


_server = None


def _get_server(env):
    global _server
    if _server is None:
        _server = _Server(env)
        atexit.register(_server.close)
    return _server if _server.serves(env) else None


def _server_failed():
    """The server ended (it could not start): every later run is a plain subprocess."""
    os.environ['LRB_TESTS_NO_FORK'] = '1'



class ServedProcess:
    """subprocess.Popen's interface (what the tests use) for a run of the server."""

    def __init__(self, server, args, cwd, env, stdout, stderr, text, start_new_session):
        self.server, self.args, self.text = server, args, text
        self.returncode = None
        self.files = {}
        for name, target in (('stdout', stdout), ('stderr', stderr)):
            if target == subprocess.PIPE:
                fd, path = tempfile.mkstemp(prefix=f'{name}_', dir=server.folder)
                os.close(fd)
                self.files[name] = path
            elif target not in (None, subprocess.DEVNULL):
                raise ValueError(f'{name}: only PIPE or DEVNULL')
        self.rid = server.submit({'argv': [str(a) for a in args[1:]], 'cwd': str(cwd or os.getcwd()),
                                  'env': env, 'out': self.files.get('stdout', os.devnull),
                                  'err': self.files.get('stderr', os.devnull), 'session': start_new_session})
        self.pid = server.reply(self.rid, 'pid', None)

    def poll(self):
        if self.returncode is None:
            try:
                self.wait(0)
            except subprocess.TimeoutExpired:
                pass
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            try:
                status = self.server.reply(self.rid, 'status', timeout)
            except subprocess.TimeoutExpired:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def _read(self, name):
        if name not in self.files:
            return None
        data = Path(self.files[name]).read_bytes()
        if not self.text:
            return data
        return data.decode('utf-8', 'replace').replace('\r\n', '\n').replace('\r', '\n')  # universal newlines

    def communicate(self, timeout=None):
        self.wait(timeout)
        out, err = self._read('stdout'), self._read('stderr')
        for path in self.files.values():
            os.unlink(path)
        self.files = {}
        return out, err

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def _served(cmd, env):
    if os.environ.get('LRB_TESTS_NO_FORK') or len(cmd) < 2 or str(cmd[0]) != sys.executable:
        return None
    script = Path(str(cmd[1]))
    if script.parent != REPO or script.name not in SERVED:
        return None
    return _get_server(env if env is not None else os.environ)


def popen(cmd, cwd=None, env=None, stdout=None, stderr=None, text=False, start_new_session=False):
    """subprocess.Popen(cmd, ...) or, for a script the server runs, the same run forked from it."""
    server = _served(cmd, env)
    if server is None:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text,
                                start_new_session=start_new_session)
    try:
        return ServedProcess(server, [str(c) for c in cmd], cwd, dict(env if env is not None else os.environ),
                             stdout, stderr, text, start_new_session)
    except RuntimeError:
        _server_failed()
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text,
                                start_new_session=start_new_session)


def run(cmd, cwd=None, env=None, capture_output=False, text=False, timeout=None, check=False):
    """subprocess.run(cmd, ...) or, for a script the server runs, the same run forked from it."""
    if _served(cmd, env) is None:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout,
                              check=check)
    pipe = subprocess.PIPE if capture_output else None
    proc = popen(cmd, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=text)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    result = subprocess.CompletedProcess([str(c) for c in cmd], proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


# --- the server ------------------------------------------------------------------------------------------------

def _preload():
    """Import every module the served scripts import at their top (failures are the runs' to report)."""
    import importlib
    for name in SERVED:
        tree = ast.parse((REPO / name).read_text())
        for node in tree.body:
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for module in modules:
                try:
                    importlib.import_module(module)
                except BaseException:  # noqa: B036 - a broken module fails the run that imports it, not us
                    pass
    try:
        importlib.import_module('transformers').BertModel  # transformers imports its models when first named
    except BaseException:  # noqa: B036
        pass
    # the repository's own modules go again: each run imports them itself (a few tens of ms), after a hook on
    # its PYTHONPATH patched what it patches, and as they are on disk now
    venv = Path(sys.prefix).resolve()
    for name, module in list(sys.modules.items()):
        path = getattr(module, '__file__', None)
        if name != '__main__' and path:
            path = Path(path).resolve()
            if REPO in path.parents and venv not in path.parents:
                del sys.modules[name]


def _serve(requests, replies):
    """Fork a child per request; report its PID and, once it ended, its wait status. Returns the request in
    the child, None in the server once the requests end and its children have."""
    children, buffer, reading = {}, b'', True
    while reading or children:
        ready = select.select([requests] if reading else [], [], [], 0.05 if children else None)[0]
        if ready:
            data = os.read(requests, 65536)
            reading = bool(data)
            buffer += data
            *lines, buffer = buffer.split(b'\n')
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    os.close(requests)
                    os.close(replies)
                    return request
                children[pid] = request['id']
                os.write(replies, (json.dumps({'id': request['id'], 'pid': pid}) + '\n').encode())
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            os.write(replies, (json.dumps({'id': children.pop(pid), 'status': status}) + '\n').encode())
    return None


def _become(request, base_path):
    """The forked child turns into `python <argv>` as started with the request's environment."""
    if request['session']:
        os.setsid()
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request['out'], os.O_WRONLY | os.O_TRUNC),
                            (2, request['err'], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    script = request['argv'][0]
    extra = [p for p in request['env'].get('PYTHONPATH', '').split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(os.path.abspath(script))] + extra + base_path
    sys.argv = list(request['argv'])
    if 'numpy' in sys.modules:  # a fresh process seeds numpy's global generator from the system
        sys.modules['numpy'].random.seed()
    for folder in extra:
        if os.path.isfile(os.path.join(folder, 'sitecustomize.py')):
            sys.modules.pop('sitecustomize', None)
            __import__('sitecustomize')  # as site.py does at start-up
            break
    return script


if __name__ == '__main__':
    _requests, _replies = int(sys.argv[1]), int(sys.argv[2])
    _inherited = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    _base_path = [p for p in sys.path[1:] if p not in _inherited]  # the interpreter's own, no script folder
    sys.path[:] = [str(REPO)] + sys.path[1:]
    _preload()
    import gc
    gc.freeze()  # what was imported stays out of the children's collections (and their copied pages)
    _request = _serve(_requests, _replies)
    if _request is not None:
        import runpy
        _script = _become(_request, _base_path)
        del _request
        runpy.run_path(_script, run_name='__main__')
