"""The localhost computer that `aiida-mlip setup` and the tests use."""
import shlex


def test_localhost_runs_commands_in_a_plain_shell_not_a_login_shell(localhost):
    """A login shell reads the profile files on every scheduler poll: 0.18 CPU-s each on the development machine."""
    with localhost.get_transport() as transport:
        status, stdout, stderr = transport.exec_command_wait('shopt -q login_shell && echo login || echo plain')
    assert status == 0, stderr
    assert stdout.strip() == 'plain'


def test_localhost_jobs_run_below_the_engine_priority(localhost):
    """The computer's prepend (the start of every job script) lowers the job's priority, and it works in the job shell:
    with more jobs than cores, the engine that retrieves the finished ones keeps its share of the CPU."""
    prepend = localhost.get_prepend_text()
    assert 'renice -n 10' in prepend
    with localhost.get_transport() as transport:
        status, stdout, stderr = transport.exec_command_wait(f'bash -c {shlex.quote(prepend + chr(10) + "ps -o ni= -p $$")}')
    assert status == 0, stderr
    assert int(stdout.split()[-1]) >= 10
