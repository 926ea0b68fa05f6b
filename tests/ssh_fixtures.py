"""A real remote computer for the tests: an ``sshd`` on 127.0.0.1 started by the test, reached with ``core.ssh``.

Everything lives in a temporary folder: the host key, the client key pair (ssh-keygen), ``authorized_keys``, the
``sshd_config`` (own port, ``PidFile``, ``StrictModes no``, ``UsePAM no``) and the computer's work directory.
Nothing is written into ``$HOME``: the AiiDA computer does not load ``~/.ssh/known_hosts`` and accepts the host key
in memory only (paramiko's AutoAddPolicy saves nothing unless a known-hosts file was loaded), ``look_for_keys`` is
off, and the only key is the one made here.

Without ``/usr/sbin/sshd`` (Debian ``openssh-server``) the tests skip with the reason; under ``CI`` they fail, since
``scripts/install.sh`` installs it there.
"""
from __future__ import annotations

import getpass
import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest

SSHD = '/usr/sbin/sshd'
#: sshd's privilege separation directory, needed when root starts it (Debian creates it in the init script, which
#: does not run in containers).
PRIVSEP_DIR = pathlib.Path('/run/sshd')


def require_or_skip(condition: bool, reason: str):
    """A missing system part fails under CI (install.sh provides it) and skips elsewhere, with the reason."""
    if condition:
        return
    if os.environ.get('CI'):
        pytest.fail(f'{reason} (scripts/install.sh installs it on CI)')
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(('127.0.0.1', 0))
        return handle.getsockname()[1]


def keygen(path: pathlib.Path) -> pathlib.Path:
    subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'aiida-mlip-test', '-f', str(path)],
                   check=True, capture_output=True)
    return path


def write_sshd_config(folder: pathlib.Path, port: int) -> pathlib.Path:
    config = folder / 'sshd_config'
    config.write_text('\n'.join([
        f'Port {port}',
        'ListenAddress 127.0.0.1',
        f'HostKey {folder / "host_key"}',
        f'AuthorizedKeysFile {folder / "authorized_keys"}',
        f'PidFile {folder / "sshd.pid"}',
        'PermitRootLogin prohibit-password',
        'PubkeyAuthentication yes',
        'PasswordAuthentication no',
        'KbdInteractiveAuthentication no',
        'StrictModes no',
        'UsePAM no',
        'PrintMotd no',
        'Subsystem sftp internal-sftp',  # the transport copies files over SFTP
        '',
    ]))
    return config


class SshServer:
    """An sshd process on 127.0.0.1:``port`` that accepts only ``client_key``."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.port = free_port()
        keygen(folder / 'host_key')
        self.client_key = keygen(folder / 'client_key')
        shutil.copy(folder / 'client_key.pub', folder / 'authorized_keys')
        self.config = write_sshd_config(folder, self.port)
        self.log = folder / 'sshd.log'
        self.process = None

    def start(self, timeout: float = 15.0):
        check = subprocess.run([SSHD, '-t', '-f', str(self.config)], capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(f'sshd refuses the test configuration: {check.stderr.strip()}')
        with open(self.log, 'w') as log:
            self.process = subprocess.Popen([SSHD, '-D', '-e', '-f', str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f'sshd exited with {self.process.returncode}: {self.log.read_text().strip()}')
            with socket.socket() as handle:
                if handle.connect_ex(('127.0.0.1', self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f'sshd did not listen on port {self.port} within {timeout} s')

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def accepted_logins(self) -> int:
        """How many public-key logins sshd accepted (its log): proof the transport really went through it."""
        return self.log.read_text().count('Accepted publickey')


def home_ssh_state() -> dict:
    """name -> (size, mtime) of ~/.ssh (absent: empty), to show that the tests write nothing there."""
    folder = pathlib.Path.home() / '.ssh'
    if not folder.is_dir():
        return {}
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


@pytest.fixture(scope='module')
def ssh_server(tmp_path_factory):
    """A running sshd for this module (stopped at the end)."""
    require_or_skip(pathlib.Path(SSHD).is_file(), f'{SSHD} not found: apt-get install openssh-server')
    require_or_skip(shutil.which('ssh-keygen') is not None, 'ssh-keygen not found: apt-get install openssh-client')
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():  # sshd started by a normal user does not use it
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
        except OSError as exception:
            require_or_skip(False, f'sshd needs its privilege separation directory {PRIVSEP_DIR}: {exception}')
    server = SshServer(tmp_path_factory.mktemp('sshd'))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_ssh_computer(ssh_server: SshServer, label: str, scheduler: str, workdir):
    """A ``core.ssh`` computer with ``scheduler`` on the test sshd: its key only, host key kept in memory, no agent."""
    from aiida import orm

    computer = orm.Computer(
        label=label, hostname='127.0.0.1', description=f'sshd started by the tests, {scheduler}',
        transport_type='core.ssh', scheduler_type=scheduler, workdir=str(workdir),
    ).store()
    computer.configure(
        username=getpass.getuser(), port=ssh_server.port, key_filename=str(ssh_server.client_key),
        look_for_keys=False, allow_agent=False, load_system_host_keys=False, key_policy='AutoAddPolicy',
        use_login_shell=False, timeout=30, safe_interval=0,
    )
    computer.set_minimum_job_poll_interval(1)
    computer.set_default_mpiprocs_per_machine(1)
    return computer


@pytest.fixture(scope='module')
def ssh_computer(aiida_profile, ssh_server, tmp_path_factory):
    """A ``core.ssh`` + ``core.direct`` computer on the test sshd, work directory in a temporary folder."""
    return make_ssh_computer(ssh_server, f'ssh-localhost-{ssh_server.port}', 'core.direct',
                             tmp_path_factory.mktemp('remote_workdir'))
