"""A real SLURM for the tests: the one-node cluster of ``scripts/slurm_local.sh``, and SLURM's own record of jobs.

The fixture starts the cluster through the script (installs ``slurm-wlm`` and ``munge`` from apt when missing) and
stops it at the end only if it started it: a cluster that already answered is used as it is. It skips with the
reason where the cluster cannot start (not root, no apt); under ``CI`` it fails instead, like tests/ssh_fixtures.py.

SLURM's record of finished jobs is the jobcomp text file (``JobCompType=jobcomp/filetxt``): one line a job,
``Key=Value`` fields (``JobId``, ``JobState``, ``TimeLimit`` in minutes, ``SubmitTime``, ``StartTime``, ``EndTime``,
``WorkDir``...), written by slurmctld itself, not by AiiDA.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import os
import pathlib
import re
import shutil
import subprocess
import time

import pytest

from .ssh_fixtures import require_or_skip

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'slurm_local.sh'


@dataclasses.dataclass
class SlurmCluster:
    jobcomp: pathlib.Path
    config: pathlib.Path
    started_here: bool

    def record(self, job_id, timeout: float = 15.0) -> dict:
        """The jobcomp record of ``job_id`` (slurmctld writes it when the job ends; wait a little for it). The last
        one: job ids start again at 1 when the cluster's state folder is removed, the jobcomp file keeps the old."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.jobcomp.read_text().splitlines() if self.jobcomp.is_file() else []
            for line in reversed(lines):
                fields = dict(re.findall(r'(\w+)=(\S*)', line))
                if fields.get('JobId') == str(job_id):
                    return fields
            if time.monotonic() > deadline:
                raise AssertionError(f'job {job_id} has no record in {self.jobcomp}')
            time.sleep(0.5)


def record_seconds(record: dict, start: str, end: str) -> float:
    """Seconds between two time fields of a jobcomp record (SLURM writes them to the second)."""
    parse = datetime.datetime.fromisoformat
    return (parse(record[end]) - parse(record[start])).total_seconds()


def run_script(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', str(SCRIPT), command], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope='module')
def slurm_cluster():
    """The running one-node cluster (started by scripts/slurm_local.sh; stopped at the end when a test fixture
    started it and no other test process still uses it).

    Users are counted with a shared lock on a file in the cluster's folder: a fixture in another pytest-xdist worker
    (or another pytest) holds it too, and the last one out, the only one that gets the exclusive lock, stops the
    cluster. A cluster that answered before any test started it is left running.
    """
    require_or_skip(os.geteuid() == 0, 'the local SLURM runs as root (SlurmUser=root, /etc/munge): run as root')
    require_or_skip(shutil.which('slurmctld') is not None or shutil.which('apt-get') is not None,
                    'no slurmctld and no apt-get to install it (Debian slurm-wlm, munge)')
    folder = pathlib.Path(os.environ.get('SLURM_LOCAL_DIR', SCRIPT.parents[1] / '.slurm')).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    users = open(folder / 'test-users.lock', 'w')  # noqa: SIM115  (held for the module's life)
    fcntl.flock(users, fcntl.LOCK_SH)
    started_by_tests = folder / 'started-by-tests'
    try:
        result = run_script('start')
        require_or_skip(result.returncode == 0,
                        f'scripts/slurm_local.sh start failed ({result.returncode}): {result.stderr.strip()[-800:]}')
        paths = dict(re.findall(r'^(config|jobcomp): *(\S+)$', result.stdout, re.MULTILINE))
        assert set(paths) == {'config', 'jobcomp'}, result.stdout
        started_here = 'SLURM started' in result.stdout
        if started_here:
            started_by_tests.touch()
        yield SlurmCluster(pathlib.Path(paths['jobcomp']), pathlib.Path(paths['config']), started_here)
    finally:
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while another test process uses the cluster
        except BlockingIOError:
            pass
        else:
            if started_by_tests.exists():
                run_script('stop')
                started_by_tests.unlink()
        users.close()


@pytest.fixture(scope='module')
def slurm_computer(aiida_profile, slurm_cluster):
    """The ``localhost-slurm`` computer exactly as ``aiida-mlip setup --scheduler slurm`` makes it."""
    from aiida_mlip.setup.environment import ensure_localhost

    computer = ensure_localhost(scheduler='core.slurm')
    # Test jobs last seconds: poll like the `localhost` test fixture (tests/conftest.py), so the two compare.
    computer.set_minimum_job_poll_interval(0.1)
    return computer
