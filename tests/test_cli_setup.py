"""`aiida-mlip setup` and `setup pseudos` through the real console script, on a temporary AIIDA_PATH."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from aiida_mlip.setup.pseudos import DEFAULT_PSEUDO_DIRS, inspect_upf, scan_upf_files, select_pseudos

SCRIPT = pathlib.Path(sys.executable).with_name('aiida-mlip')
DEBIAN_PSEUDOS = pathlib.Path('/usr/share/espresso/pseudo')
needs_debian_pseudos = pytest.mark.skipif(not DEBIAN_PSEUDOS.is_dir(), reason='quantum-espresso-data not installed')


def run_cli(*args, aiida_path=None):
    env = {key: value for key, value in os.environ.items() if key not in ('AIIDA_PATH', 'AIIDA_MLIP_PROFILE')}
    if aiida_path is not None:
        env['AIIDA_PATH'] = str(aiida_path)
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


@needs_debian_pseudos
def test_setup_creates_everything_once_and_is_idempotent(tmp_path):
    if shutil.which('pw.x') is None:
        pytest.skip('pw.x not installed')
    first = run_cli('setup', aiida_path=tmp_path)
    assert first.returncode == 0, first.stderr
    assert 'profile `aiida-mlip`: created' in first.stdout
    assert 'code `pw@localhost`' in first.stdout
    assert 'Si ' in first.stdout and 'PBE' in first.stdout
    second = run_cli('setup', aiida_path=tmp_path)
    assert second.returncode == 0, second.stderr
    assert 'profile `aiida-mlip`: exists' in second.stdout
    assert '(PBE, exists)' in second.stdout
    assert (tmp_path / '.aiida').is_dir()  # everything inside AIIDA_PATH, nothing in the home folder


def test_setup_refuses_to_guess_where_to_write(tmp_path):
    result = run_cli('setup')
    assert result.returncode == 2
    assert 'AIIDA_PATH is not set' in result.stderr


@needs_debian_pseudos
def test_setup_pseudos_keeps_one_functional_and_refuses_mixing(tmp_path):
    folder = tmp_path / 'upf'
    folder.mkdir()
    for name in ('Si.pbe-rrkj.UPF', 'Si.pz-vbc.UPF', 'Ge.pbe-kjpaw.UPF'):
        shutil.copy(DEBIAN_PSEUDOS / name, folder / name)
    aiida_path = tmp_path / 'config'
    assert run_cli('setup', '--no-pseudos', aiida_path=aiida_path).returncode in (0, 2)  # pw.x may be absent
    result = run_cli('setup', 'pseudos', '--from', str(folder), '--label', 'MINI', aiida_path=aiida_path)
    assert result.returncode == 0, result.stderr
    assert '2 elements' in result.stdout
    assert 'Si.pbe-rrkj.UPF' in result.stdout and 'Si.pz-vbc.UPF' not in result.stdout
    mixed = run_cli('setup', 'pseudos', '--from', str(folder), '--label', 'MIXED', '--pick', 'Si=Si.pz-vbc.UPF',
                    aiida_path=aiida_path)
    assert mixed.returncode == 2
    assert 'LDA' in mixed.stderr and 'mixing functionals' in mixed.stderr


@needs_debian_pseudos
def test_upf_inspection_reads_v1_v2_and_gzip():
    uspp = inspect_upf(DEBIAN_PSEUDOS / 'Si.pbe-nl-rrkjus_psl.1.0.0.UPF')
    assert (uspp.element, uspp.functional, uspp.pseudo_type) == ('Si', 'PBE', 'US')
    assert uspp.recommended_cutoffs_ry == (44.0, 175.0)
    soft = inspect_upf(DEBIAN_PSEUDOS / 'Si.pbe-rrkj.UPF')
    assert soft.pseudo_type == 'NC' and soft.recommended_cutoffs_ry == (60.0, 240.0)  # no suggestion: default
    assert inspect_upf(DEBIAN_PSEUDOS / 'Si.pz-vbc.UPF').functional == 'LDA'
    gzipped = [p for p in pathlib.Path('/usr/share/doc/quantum-espresso/examples').rglob('Ag_ONCV_PBE-1.0.upf.gz')]
    if gzipped:
        assert inspect_upf(gzipped[0]).element == 'Ag'


@needs_debian_pseudos
def test_default_selection_covers_the_expected_pbe_elements():
    selection = select_pseudos(scan_upf_files([d for d in DEFAULT_PSEUDO_DIRS if d.is_dir()]), 'PBE')
    assert {'Si', 'Ge', 'C', 'Cu', 'Ni', 'Ag', 'Ga', 'As', 'N', 'B'} <= set(selection)
    assert all(info.functional == 'PBE' and not info.fully_relativistic for info in selection.values())
    assert 'Pt' not in selection  # only a fully-relativistic PBE file exists for Pt
    assert 'Co' not in selection  # CorelUSPBE.RRKJ3.UPF says so only in its PP_INFO: 'Fully-Relativistic'
