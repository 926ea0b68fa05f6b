"""Root command group and the helpers every subcommand shares."""
from __future__ import annotations

import click

from aiida_mlip import __version__


class BadInput(click.ClickException):
    """A refusal of the user's input before any compute: message on stderr, exit code 2 like verdi's usage errors."""

    exit_code = 2


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(__version__, '-v', '--version')
@click.option('-p', '--profile', 'profile_name', default=None, envvar='AIIDA_MLIP_PROFILE',
              help='AiiDA profile to use (default: the default profile of the configuration in AIIDA_PATH).')
@click.pass_context
def cli(ctx, profile_name):
    """aiida-mlip: DFT-labeled machine-learning interatomic potentials with full AiiDA provenance."""
    ctx.ensure_object(dict)
    ctx.obj['profile'] = profile_name


def load_profile_from_context(ctx):
    """Load the profile chosen with ``-p`` (or the default one); a clear error when there is none."""
    from aiida import load_profile
    from aiida.common.exceptions import ConfigurationError, MissingConfigurationError, ProfileConfigurationError

    try:
        return load_profile(ctx.obj.get('profile'), allow_switch=True)
    except (MissingConfigurationError, ProfileConfigurationError, ConfigurationError) as exception:
        raise BadInput(f'no usable AiiDA profile ({exception}); run `aiida-mlip setup` first') from exception
