"""docs/cli.md is generated from the click commands (scripts/cli_reference.py) and must match them."""
import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'cli_reference.py'


def test_docs_cli_md_is_up_to_date():
    spec = importlib.util.spec_from_file_location('cli_reference', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.render()
    current = module.TARGET.read_text() if module.TARGET.is_file() else ''
    assert current == expected, 'docs/cli.md is out of date: run .venv/bin/python scripts/cli_reference.py'
    for group in ('model', 'query', 'setup'):
        assert f'## `aiida-mlip {group}`' in expected
