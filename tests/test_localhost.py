"""The localhost computer that `aiida-mlip setup` and the tests use."""


def test_localhost_runs_commands_in_a_plain_shell_not_a_login_shell(localhost):
    """A login shell reads the profile files on every scheduler poll: 0.18 CPU-s each on the development machine."""
    with localhost.get_transport() as transport:
        status, stdout, stderr = transport.exec_command_wait('shopt -q login_shell && echo login || echo plain')
    assert status == 0, stderr
    assert stdout.strip() == 'plain'
