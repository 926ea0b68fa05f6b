"""The ``aiida-mlip`` console script (click, following ``verdi``'s conventions: ``-p/--profile``, exit code 2 on bad input).

Each command group lives in its own module and is attached here.
"""
from aiida_mlip.cli.root import cli
from aiida_mlip.cli import campaign as _campaign  # noqa: F401  (registers `campaign`)
from aiida_mlip.cli import model as _model  # noqa: F401  (registers `model`)
from aiida_mlip.cli import report as _report  # noqa: F401  (registers `report`)
from aiida_mlip.cli import query as _query  # noqa: F401  (registers `query`)
from aiida_mlip.cli import setup as _setup  # noqa: F401  (registers `setup`)

__all__ = ('cli',)
