"""A real single-node SLURM for the tests: munged + slurmctld + slurmd from Debian's slurm-wlm, configured
for this host (its CPUs, no GPUs), in a folder of its own with its own ports, so it touches no system
SLURM. Installed with apt-get when missing (as root, as on CI). Not a mock: jobs are real sbatch jobs,
time limits, signals and requeues are SLURM's.

Settings a test relies on: proctrack/linuxproc and task/none (no cgroups needed); cred_expire=10, so a
requeued job may start again after ~10 s instead of SLURM's default 120 s; jobcomp/filetxt, the jobs'
record (there is no accounting database, so no sacct)."""
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ('slurmctld', 'slurmd', 'munged')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def install():
    """-> None when SLURM's daemons are here (installed now if need be), else the reason they are not."""
    if all(shutil.which(d) or os.path.exists(f'/usr/sbin/{d}') for d in DAEMONS):
        return None
    if os.geteuid() != 0 or not shutil.which('apt-get'):
        return 'SLURM (slurm-wlm, munge) is not installed and this is not root with apt-get to install it'
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    cmd = ['apt-get', 'install', '-y', '-q', '--no-install-recommends', 'slurm-wlm', 'munge']
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(['apt-get', 'update', '-q'], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f'apt-get install slurm-wlm munge failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}')
    return None


class LocalSlurm:
    def __init__(self, root):
        self.root = Path(root)
        self.host = socket.gethostname().split('.')[0]
        self.conf = self.root / 'slurm.conf'
        self.jobcomp = self.root / 'jobcomp.log'
        self.env = dict(SLURM_CONF=str(self.conf))

    def _sbin(self, name):
        return shutil.which(name) or f'/usr/sbin/{name}'

    def write_config(self):
        r = self.root
        for d in ('state', 'spool', 'munge'):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / 'munge', 0o700)
        key = r / 'munge' / 'munge.key'
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2 ** 20 * 9 // 10
        self.conf.write_text('\n'.join([
            'ClusterName=tests', f'SlurmctldHost={self.host}', 'SlurmUser=root', 'SlurmdUser=root',
            'AuthType=auth/munge', 'CredType=cred/munge',
            f'AuthInfo=socket={r}/munge/munge.socket,cred_expire=10',
            f'StateSaveLocation={r}/state', f'SlurmdSpoolDir={r}/spool',
            f'SlurmctldPidFile={r}/slurmctld.pid', f'SlurmdPidFile={r}/slurmd.pid',
            f'SlurmctldLogFile={r}/slurmctld.log', f'SlurmdLogFile={r}/slurmd.log',
            f'SlurmctldPort={_free_port()}', f'SlurmdPort={_free_port()}',
            'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none', 'MpiDefault=none',
            'SchedulerType=sched/backfill', 'SelectType=select/cons_tres', 'SelectTypeParameters=CR_CPU',
            'ReturnToService=2', 'JobCompType=jobcomp/filetxt', f'JobCompLoc={self.jobcomp}',
            'AccountingStorageType=accounting_storage/none', 'JobAcctGatherType=jobacct_gather/none',
            'SlurmctldTimeout=30', 'SlurmdTimeout=30', 'InactiveLimit=0', 'MinJobAge=600', 'KillWait=5',
            f'NodeName={self.host} CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN',
            f'PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP', '']))

    def start(self, timeout=60):
        self.write_config()
        r = self.root
        env = dict(os.environ, **self.env)
        subprocess.run([self._sbin('munged'), '--force', '-S', f'{r}/munge/munge.socket', '--key-file',
                        f'{r}/munge/munge.key', '--pid-file', f'{r}/munge/munged.pid', '--log-file',
                        f'{r}/munge/munged.log', '--seed-file', f'{r}/munge/seed'], check=True, env=env)
        subprocess.run([self._sbin('slurmctld'), '-f', str(self.conf), '-i'], check=True, env=env)
        subprocess.run([self._sbin('slurmd'), '-f', str(self.conf)], check=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run(['sinfo', '-h', '-o', '%T'], capture_output=True, text=True, env=env)
            if r.returncode == 0 and r.stdout.strip() == 'idle':
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f'SLURM did not come up in {timeout} s; see {self.root}/slurmctld.log and slurmd.log')

    def stop(self):
        env = dict(os.environ, **self.env)
        subprocess.run(['scancel', '--full', '-u', 'root'], capture_output=True, env=env)
        for pid_file in ('slurmd.pid', 'slurmctld.pid', 'munge/munged.pid'):
            try:
                pid = int((self.root / pid_file).read_text())
                os.kill(pid, 15)
            except (OSError, ValueError):
                continue
            for _ in range(50):  # up to 5 s each
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)

    def completions(self):
        """The job-completion record: [{'JobId': ..., 'JobState': ..., 'Name': ...}, ...]."""
        if not self.jobcomp.is_file():
            return []
        out = []
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(f.split('=', 1) for f in line.split() if '=' in f)
            if fields:
                out.append(fields)
        return out
