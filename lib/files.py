"""File safety of every entry point: nothing half-written, no finished result replaced silently, nothing
left behind by a killed run, and a full disk said up front.

- writes: `atomic_file` (one file), `atomic_output_dir` (a whole folder), both through temporaries named by
  `temp_path`, so `remove_stale_temporaries` can clean what a killed run left, and nothing else;
  `write_error`: an OSError met while writing as one OutputError naming the path.
- before writing: `guard_run_dir` (training output folders), `guard_output_dir` (a folder of results),
  `guard_output_file` (one result file), `check_writable_dir`, `check_free_space`.
"""
import contextlib
import errno
import hashlib
import logging
import os
import re
import shlex
import shutil
import socket
import tempfile
from pathlib import Path

import utils
from utils import InputError, OutputError

logger = logging.getLogger('lrb')


_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
# .<name>.tmp<pid>-<host><suffix> (atomic_file; older versions: no -<host>),
# .<name>.tmp-<pid>-<host>-<random> and .<name>.old-<pid>-<host> (atomic_output_dir),
# .lrb-probe-<pid>-<host>-<random> (check_writable_dir)
_TEMP_FILE = re.compile(r'^\.(?P<name>.+)\.tmp(?P<pid>\d+)(?:-(?P<host>[0-9a-f]{6}))?(?P<suffix>\.[^.]*)?$')
_TEMP_DIR = re.compile(r'^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})(?:-[\w]+)?$')
_PROBE = re.compile(r'^\.lrb-probe-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-\w+$')


def temp_path(path):
    """The temporary name `atomic_file` writes `path` under: hidden, in the same folder, tagged with
    this process and host, same suffix (writers that go by the suffix pick the right format)."""
    path = Path(path)
    return path.with_name(f'.{path.name}.tmp{os.getpid()}-{_HOST_TAG}{path.suffix}')


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _stale(match):
    """A temporary of ours whose process is gone (on this host; other hosts' are left alone)."""
    host = match.groupdict().get('host')
    return (host is None or host == _HOST_TAG) and not _pid_alive(int(match.group('pid')))


def remove_stale_temporaries(folder):
    """Delete what killed runs of this code left in `folder`: temporaries named by `temp_path`,
    `atomic_output_dir` and `check_writable_dir` whose process no longer runs (and only those).
    A half-swapped output folder (killed between its two renames) is put back instead.
    Called by `guard_run_dir` and `atomic_output_dir`; returns the names removed."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        name = entry.name
        if not name.startswith('.'):
            continue
        try:
            m = _TEMP_FILE.match(name)
            if m and entry.is_file(follow_symlinks=False) and (m.group('suffix') or '') == Path(
                    m.group('name')).suffix and _stale(m):
                os.unlink(entry.path)
                removed.append(name)
                continue
            m = _PROBE.match(name)
            if m and entry.is_file(follow_symlinks=False) and _stale(m):
                os.unlink(entry.path)
                removed.append(name)
                continue
            m = _TEMP_DIR.match(name)
            if m and entry.is_dir(follow_symlinks=False) and _stale(m):
                final = folder / m.group('name')
                if m.group('kind') == 'old' and not os.path.lexists(final):
                    os.replace(entry.path, final)  # the previous output, never replaced: restore it
                    logger.warning(f'restored {final} from {name}, left by an interrupted run')
                    continue
                shutil.rmtree(entry.path)
                removed.append(name)
        except FileNotFoundError:
            continue  # another process cleaned it first
    if removed:
        logger.warning(f"removed {len(removed)} temporary file(s) left by killed runs in {folder}: "
                       f"{', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}")
    return removed


def _existing_ancestor(path):
    path = Path(path).absolute()
    while not os.path.lexists(path):
        path = path.parent
    return path


def check_writable_dir(path, flag):
    """One-line InputError unless `path` is (or can be created as) a folder this process can write in.
    Creates nothing that stays: a probe file in the nearest existing folder is made and removed."""
    path = Path(path)
    base = _existing_ancestor(path)
    if not base.is_dir():
        what = 'is a file' if base == path.absolute() else f'lies under {base}, which is a file'
        raise InputError(f'{flag} {path}: {what}, not a folder')
    try:
        fd, probe = tempfile.mkstemp(prefix=f'.lrb-probe-{os.getpid()}-{_HOST_TAG}-', dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f'{flag} {path}: cannot write in {base} ({e.strerror or e})') from None
    return base


def format_bytes(n):
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if abs(n) < 1000 or unit == 'TB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1000


def free_bytes(path):
    """Free space on the file system that holds `path` (or would, once created)."""
    return shutil.disk_usage(_existing_ancestor(path)).free


def check_free_space(path, needed, flag, what):
    """One-line OutputError when the file system of `path` has less than `needed` bytes free;
    `what` says what the bytes are for (e.g. '3 checkpoints of about 1.2 GB')."""
    free = free_bytes(path)
    if free < needed:
        raise OutputError(f'{flag} {path}: only {format_bytes(free)} free, {what} need about '
                          f'{format_bytes(needed)}; free some space or choose another {flag}')
    return free


def _existing_outputs(out, file_names):
    found = []
    if out.is_dir():
        for name in file_names:
            if any(c in name for c in '*?['):
                found += sorted(p.name for p in out.glob(name))
            elif os.path.lexists(out / name):
                found.append(name)
    return found


def guard_output_dir(output_dir, file_names, *, overwrite=False, flag, overwrite_flag='--overwrite'):
    """Before a script writes `file_names` (names or glob patterns) into `output_dir`: refuse (one line)
    when it is a file, cannot be written, or already holds any of them, unless `overwrite`; then remove
    stale temporaries of killed runs. Creates nothing. (test.py's --vis_dir; for training runs use
    guard_run_dir.)"""
    out = Path(output_dir)
    check_writable_dir(out, flag)
    existing = [] if overwrite else _existing_outputs(out, file_names)
    if existing:
        more = f' and {len(existing) - 1} more' if len(existing) > 1 else ''
        raise InputError(f'{flag} {out}: holds {existing[0]}{more} from an earlier run; pass {overwrite_flag} '
                         f'to replace them')
    if int(os.environ.get('RANK', '0') or 0) == 0:
        remove_stale_temporaries(out)


def guard_run_dir(output_dir, file_names, *, resume='', overwrite=False, dir_flag='--output-dir',
                  resume_flag='--resume', overwrite_flag='--overwrite', resume_hint=None):
    """Before a training run writes into `output_dir`: refuse (one line) when it is a file or cannot be
    written, or when it already holds any of `file_names` (the files this run would write: a finished
    run's checkpoints; glob patterns allowed) unless the user asked to continue (`resume`: the path given
    to continue from) or to replace (`overwrite`); the message names both flags (`resume_hint`: the file
    to suggest). Then removes stale temporaries of killed runs (rank 0). Creates nothing.
    Call it at the start of every training script, e.g. with `checkpoint.run_file_names(...)`; it also
    arms the Ctrl-C message of `utils.run_cli`. A script whose --resume is not a continuation (the stage
    scripts' teacher) passes resume='' and resume_flag=None: then only `overwrite_flag` is offered."""
    out = Path(output_dir)
    check_writable_dir(out, dir_flag)
    existing = [] if (resume or overwrite) else _existing_outputs(out, file_names)
    if existing:
        more = f' and {len(existing) - 1} more' if len(existing) > 1 else ''
        hint = shlex.quote(str(out / (resume_hint if resume_hint and (out / resume_hint).is_file() else existing[0])))
        resume_part = f'{resume_flag} {hint} to continue it or ' if resume_flag else ''
        raise InputError(f'{dir_flag} {out}: holds {existing[0]}{more} of a finished run; pass '
                         f'{resume_part}{overwrite_flag} to replace it')
    utils.record_run(out, resume, resume_flag)
    if int(os.environ.get('RANK', '0') or 0) == 0:
        remove_stale_temporaries(out)


def guard_output_file(path, *, overwrite=False, flag, overwrite_flag='--overwrite'):
    """Before a script writes one result file (test.py's metrics JSON): refuse (one line) when it exists
    (unless `overwrite`), is a folder, or its folder cannot be written; stale temporaries go."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f'{flag} {path}: is a directory, not a file')
    if os.path.lexists(path) and not overwrite:
        raise InputError(f'{flag} {path}: exists; pass {overwrite_flag} to replace it')
    check_writable_dir(path.parent, flag)
    remove_stale_temporaries(path.parent)


def write_error(path, exc, tmp=None):
    """OutputError 'cannot write PATH: cause' for an OSError met while writing `path`."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    other = getattr(exc, 'filename', None)
    other = os.fsdecode(other) if isinstance(other, bytes) else other  # TensorBoard's writer says b'...'
    extra = f" ('{other}')" if other and str(other) not in (str(path), str(tmp)) else ''
    if exc.errno == errno.ENOSPC:
        with contextlib.suppress(OSError):
            extra += f', {format_bytes(free_bytes(path))} free'
    return OutputError(f"cannot write '{path}': {cause}{extra}")


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path` (see `temp_path`); on success it is flushed to disk and
    renamed onto `path`, on failure removed. Readers never see a half-written file; an OSError while
    writing becomes an OutputError naming `path` and the cause (`No space left on device`)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e, tmp) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()



def write_text_atomic(path, text):
    """`text` into `path` through `atomic_file`: the whole file or, on failure, the previous one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)

def _check_output_dir(out, overwrite, flag):
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{flag} {out}: is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out, overwrite=False, flag='--out'):
    """Yield a fresh temporary folder beside `out`; on success it replaces `out` in one rename.

    A non-empty `out` is refused (one-line InputError naming `flag`) unless `overwrite`; then the old
    folder is swapped out and removed only after the new one is in place. On failure nothing changes;
    an OSError while writing is one OutputError naming the file and the cause. Temporaries that a
    killed run left beside `out` are removed first (see `remove_stale_temporaries`).
    """
    out = Path(out).absolute()
    _check_output_dir(out, overwrite, flag)
    check_writable_dir(out.parent, flag)
    remove_stale_temporaries(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-{os.getpid()}-{_HOST_TAG}-', dir=out.parent))
    except OSError as e:
        raise InputError(f'{flag} {out}: cannot write in {out.parent} ({e.strerror})') from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like a mkdir
    try:
        try:
            yield tmp
        except OSError as e:
            name = str(e.filename or '')
            shown = out / os.path.relpath(name, tmp) if name.startswith(str(tmp)) else (name or out)
            raise OutputError(f"{flag} {out}: cannot write '{shown}': {e.strerror or e}") from None
        if not out.exists() and not out.is_symlink():
            os.replace(tmp, out)
            return
        old = out.with_name(f'.{out.name}.old-{os.getpid()}-{_HOST_TAG}')
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        if old.is_symlink():  # `out` was a link to a folder: drop the link, keep what it pointed to
            old.unlink()
        else:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
