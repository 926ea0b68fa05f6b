"""Shared fixtures: a temporary AiiDA profile (aiida-core's fixtures), the real pw.x, a local PBE family, Si cells."""
import os
import shutil

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import pytest  # noqa: E402

pytest_plugins = ['aiida.tools.pytest_fixtures']

#: Low-cost DFT for tests (DESIGN.md: ~20 Ry, coarse k, loose conv_thr); production protocols stay converged.
TEST_PW_OVERRIDES = {
    'kpoints_distance': 0.6,
    'pw': {'parameters': {'SYSTEM': {'ecutwfc': 20.0, 'ecutrho': 160.0}}},
}
TEST_FAMILY = 'PBE-test'


#: Test modules sharing the costly session fixtures of fixtures_mlip.py (a trained committee, a validation, a
#: fine-tuning): under pytest-xdist one worker runs them all, so each of those fixtures is computed once.
SHARED_MODEL_MODULES = {'test_report', 'test_validation', 'test_training', 'test_finetune', 'test_query'}
#: The longest groups (minutes each, `--durations`), sent to the workers first so that the workers end together.
LONGEST_GROUPS = ('test_production', 'shared_models', 'test_refinement', 'test_campaign', 'test_transferability',
                  'test_active_learning')


def xdist_group(item) -> str:
    module = item.module.__name__.rsplit('.', 1)[-1]
    return 'shared_models' if module in SHARED_MODEL_MODULES else item.module.__name__.removeprefix('tests.')


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Keep each module's tests in one pytest-xdist worker (`--dist loadgroup`, scripts/test.sh), so module
    fixtures run once, and put the longest groups first. First among the hooks: pytest-xdist's own hook turns the
    `xdist_group` marks into the node ids' `@group` suffix, and marks added after it are ignored (each test was
    then scheduled alone and module fixtures ran once per worker)."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item)))

    def rank(item):
        group = xdist_group(item)
        return LONGEST_GROUPS.index(group) if group in LONGEST_GROUPS else len(LONGEST_GROUPS)

    items.sort(key=rank)  # stable: the order inside a group is kept


def pw_available() -> bool:
    return shutil.which('pw.x') is not None


def require_pw():
    """pw.x is part of the test environment: CI fails without it, a developer machine skips with the reason."""
    if not pw_available():
        if os.environ.get('CI'):
            pytest.fail('pw.x is not installed: .ci/run must install the Debian package quantum-espresso')
        pytest.skip('pw.x not found: apt-get install quantum-espresso quantum-espresso-data')


@pytest.fixture(scope='session')
def localhost(aiida_profile):
    from aiida_mlip.setup.environment import ensure_localhost

    computer = ensure_localhost()
    # Test jobs last a second or less: poll at aiida-core's core.local default instead of our production 1 s.
    computer.set_minimum_job_poll_interval(0.1)
    return computer


@pytest.fixture(scope='session')
def pw_code(localhost):
    require_pw()
    from aiida_mlip.setup.environment import ensure_pw_code

    return ensure_pw_code(localhost)


@pytest.fixture(scope='session')
def pseudo_family(aiida_profile):
    """A PBE family built from the Debian quantum-espresso-data folders (the real offline source)."""
    from aiida_mlip.setup.pseudos import DEFAULT_PSEUDO_DIRS, install_family, scan_upf_files, select_pseudos

    dirs = [d for d in DEFAULT_PSEUDO_DIRS if d.is_dir()]
    if not dirs:
        if os.environ.get('CI'):
            pytest.fail('quantum-espresso-data is not installed')
        pytest.skip('no pseudopotential folder: apt-get install quantum-espresso-data')
    family, _ = install_family(TEST_FAMILY, select_pseudos(scan_upf_files(dirs), 'PBE'), 'PBE')
    return family


@pytest.fixture(scope='session')
def tiny_mace_committee(tmp_path_factory) -> list:
    """Paths of two tiny MACE models (float32, seeds 1 and 2; tests/tiny_mace.py), trained once per session for the
    engine tests (``trained_models``) and the CalcJob tests (``tiny_mace_files``)."""
    from tests.tiny_mace import train_tiny_committee

    return train_tiny_committee(tmp_path_factory.mktemp('tiny_mace'))


@pytest.fixture
def si2():
    """Primitive diamond Si, compressed to 97% of a = 5.43 Å so that its stress is clearly non-zero."""
    from aiida import orm
    from ase.build import bulk

    atoms = bulk('Si', 'diamond', a=5.43 * 0.97)
    return orm.StructureData(ase=atoms)


@pytest.fixture
def si8():
    """Conventional diamond Si cell (8 atoms)."""
    from aiida import orm
    from ase.build import bulk

    return orm.StructureData(ase=bulk('Si', 'diamond', a=5.43, cubic=True))


def count_calcjobs() -> int:
    from aiida import orm

    return orm.QueryBuilder().append(orm.CalcJobNode).count()


@pytest.fixture(scope='session', autouse=True)
def nothing_written_to_the_working_tree():
    """Hygiene: no test may leave files in the project folder (dry runs, mace's *_valid_indices_*.txt...)."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]

    def untracked():
        result = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all'], cwd=root,
                                capture_output=True, text=True)
        return {line[3:] for line in result.stdout.splitlines() if line.startswith('??')} if result.returncode == 0 \
            else set()

    source_folders = ('aiida_mlip/', 'tests/', 'docs/', 'benchmarks/', 'examples/', 'workflows/', 'scripts/')
    before = untracked()
    yield
    # Leaks land where a process runs (the project root: submit_test/, *_valid_indices_*.txt, logs/); new files
    # in the source folders are someone's edits, not a test's output.
    leaked = sorted(path for path in untracked() - before if not path.startswith(source_folders))
    assert not leaked, f'tests left files in the project folder: {leaked[:10]}'
