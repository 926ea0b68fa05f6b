"""Campaign files: every bad file is refused with a precise ``FILE:KEY: problem`` line, before anything is stored.

The schema tests need no profile; the last tests run ``aiida-mlip campaign validate|run`` on bad files in the test
profile and check that the refusal exits with 2 and creates no process.
"""
import pathlib

import pytest
import yaml

from aiida_mlip.campaigns.schema import CampaignError, check_campaign, load_campaign

from .fixtures_mlip import mlip_codes  # noqa: F401  (fixture)

WORKFLOWS = pathlib.Path(__file__).resolve().parents[1] / 'workflows'

GOOD = {
    'name': 'demo',
    'classes': {
        'covalent': {'materials': [{'formula': 'Si', 'prototype': 'diamond', 'a': 5.43}]},
        'metals': {'materials': [{'formula': 'Cu', 'prototype': 'fcc', 'a': 3.61, 'cubic': True}]},
    },
    'sampling': {'volumes': [-0.02, 0.0, 0.02], 'rattle': {'amplitude': 0.05, 'count': 2, 'seed': 3}},
    'training': {'committee_size': 2},
    'validation': {'properties': ['eos']},
    'transferability': {'enabled': True},
}


def modified(change) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    change(data)
    return data


def errors_of(data) -> list[str]:
    with pytest.raises(CampaignError) as info:
        check_campaign(data, 'camp.yaml')
    return info.value.errors


def test_good_campaign_is_normalised():
    campaign = check_campaign(GOOD, 'camp.yaml')
    assert campaign['elements'] == ['Cu', 'Si']
    assert campaign['classes'] == {'covalent': ['si'], 'metals': ['cu']}
    assert campaign['materials']['si']['n_atoms'] == 2 and campaign['materials']['cu']['elements'] == ['Cu']
    assert campaign['materials']['cu']['n_atoms'] == 4  # cubic: a rattled cell with forces
    assert campaign['materials']['si']['sampling']['rattle'] == {'amplitude': 0.05, 'count': 2, 'seed': 3}
    assert campaign['dft']['protocol'] == 'fast' and campaign['training']['mode'] == 'scratch'
    assert campaign['transferability']['train_all'] is True


def test_supercell_matrix_is_accepted_and_counted_for_the_one_atom_check():
    """A 3x3 matrix (e.g. the 4-atom Si cell commensurate with an X point) is kept; a 1-atom fcc cell doubled by a
    matrix has 2 atoms, so it may be rattled."""
    x_cell = [[1, -1, 0], [1, 1, 0], [0, 0, 1]]
    data = modified(lambda d: (d['classes']['covalent']['materials'][0].update(sampling={'supercell': x_cell}),
                               d['classes']['metals']['materials'][0].update(cubic=False, sampling={'supercell': x_cell})))
    campaign = check_campaign(data, 'camp.yaml')
    assert campaign['materials']['si']['sampling']['supercell'] == x_cell
    assert campaign['materials']['cu']['sampling']['supercell'] == x_cell


def test_pw_parameters_are_kept_by_namelist():
    campaign = check_campaign({**GOOD, 'dft': {'parameters': {'SYSTEM': {'nbnd': 40, 'degauss': 0.01},
                                                              'ELECTRONS': {'mixing_beta': 0.3}}}}, 'camp.yaml')
    assert campaign['dft']['parameters'] == {'SYSTEM': {'nbnd': 40, 'degauss': 0.01}, 'ELECTRONS': {'mixing_beta': 0.3}}


def test_resources_become_the_metadata_options_of_each_kind_of_job():
    """Counts become ``options.resources`` (one machine unless given); a job kind the file does not name keeps the
    builders' defaults."""
    campaign = check_campaign({**GOOD, 'resources': {
        'pw': {'num_mpiprocs_per_machine': 4, 'max_wallclock_seconds': 1800, 'queue_name': 'debug', 'account': 'p1'},
        'mace_train': {'custom_scheduler_commands': '#SBATCH --gres=gpu:1', 'qos': 'short', 'max_memory_kb': 8000000},
    }}, 'camp.yaml')
    assert campaign['resources'] == {
        'pw': {'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 4}, 'max_wallclock_seconds': 1800,
               'queue_name': 'debug', 'account': 'p1'},
        'mace_train': {'custom_scheduler_commands': '#SBATCH --gres=gpu:1', 'qos': 'short', 'max_memory_kb': 8000000},
    }
    assert check_campaign(GOOD, 'camp.yaml')['resources'] == {}


@pytest.mark.parametrize('path', sorted(WORKFLOWS.glob('*.yaml')), ids=lambda path: path.name)
def test_shipped_campaign_files_are_valid(path):
    campaign = load_campaign(path)
    assert campaign['name'] == path.stem


@pytest.mark.parametrize('change, expected', [
    # unknown keys, with a guess
    (lambda d: d.update(clases=d.pop('classes')),
     ['camp.yaml:clases: unknown key; did you mean `classes`?', 'camp.yaml:classes: required']),
    (lambda d: d['training'].update(comittee_size=3), ['camp.yaml:training.comittee_size: unknown key; did you mean '
                                                       '`committee_size`?']),
    (lambda d: d['classes']['covalent']['materials'][0].update(lattice=5.4),
     ['camp.yaml:classes.covalent.materials[0].lattice: unknown key']),
    # wrong types
    (lambda d: d['training'].update(committee_size='three'),
     ['camp.yaml:training.committee_size: must be an integer, got a string']),
    (lambda d: d['sampling'].update(volumes=0.02), ['camp.yaml:sampling.volumes: must be a list of numbers, got 0.02']),
    (lambda d: d.update(dft={'max_concurrent': 0}), ['camp.yaml:dft.max_concurrent: must be >= 1, got 0']),
    (lambda d: d.update(dft={'max_concurrent': 2.5}), ['camp.yaml:dft.max_concurrent: must be an integer']),
    (lambda d: d['validation'].update(relax='yes'), ['camp.yaml:validation.relax: must be true or false']),
    (lambda d: d.update(resources={'md': {'queue_name': 'debug'}}),
     ['camp.yaml:resources.md: unknown key; allowed: evaluate, mace_train, pw']),
    (lambda d: d.update(resources={'pw': {'walltime': 60, 'max_wallclock_seconds': '1h', 'num_machines': 0}}),
     ['camp.yaml:resources.pw.walltime: unknown key', 'camp.yaml:resources.pw.max_wallclock_seconds: must be an '
      'integer, got a string', 'camp.yaml:resources.pw.num_machines: must be > 0, got 0']),
    (lambda d: d.update(resources={'evaluate': {'queue_name': 3}, 'mace_train': 'gpu'}),
     ['camp.yaml:resources.evaluate.queue_name: must be a string, got int 3',
      'camp.yaml:resources.mace_train: must be a mapping']),
    (lambda d: d.update(dft={'parameters': {'SYSTEM': {'ecutwfc': 60, 'nbnd': [8]}, 'CONTROL': {'tstress': False}}}),
     ['camp.yaml:dft.parameters.CONTROL: unknown key', 'camp.yaml:dft.parameters.SYSTEM.ecutwfc: set by dft.ecutwfc',
      'camp.yaml:dft.parameters.SYSTEM.nbnd: must be a number, string or true/false']),
    # unknown protocols and choices
    (lambda d: d.update(dft={'protocol': 'quick'}),
     ['camp.yaml:dft.protocol: `quick` is not one of fast, balanced, stringent']),
    (lambda d: d['validation'].update(protocol='fats'), ['camp.yaml:validation.protocol: `fats` is not one of '
                                                         'fast, balanced, stringent, accurate; did you mean `fast`?']),
    (lambda d: d['validation'].update(properties=['eos', 'phonon']),
     ['camp.yaml:validation.properties[1]: `phonon` is not one of eos, elastic, phonons, md_stability; '
      'did you mean `phonons`?']),
    (lambda d: d['classes']['metals']['materials'][0].update(prototype='fc'),
     ['camp.yaml:classes.metals.materials[0].prototype: `fc` is not one of']),
    # zero or negative sizes
    (lambda d: d['training'].update(committee_size=0), ['camp.yaml:training.committee_size: must be > 0, got 0']),
    (lambda d: d['sampling']['rattle'].update(count=-2), ['camp.yaml:sampling.rattle.count: must be > 0, got -2']),
    (lambda d: d['classes']['covalent']['materials'][0].update(a=-5.43),
     ['camp.yaml:classes.covalent.materials[0].a: must be > 0, got -5.43']),
    # physics and consistency
    (lambda d: d['classes']['covalent']['materials'][0].update(a=0.5),
     ['camp.yaml:classes.covalent.materials[0]: atoms 0 and 1 are 0.217 Å apart']),
    (lambda d: d['sampling'].update(volumes=[-0.6, 0.0]),
     ['camp.yaml:sampling.volumes: relative volume changes must lie in (-0.5, 0.5)']),
    (lambda d: d.update(dft={'ecutwfc': 30}), ['camp.yaml:dft: give both ecutwfc and ecutrho, or neither']),
    (lambda d: d['training'].update(split_fractions={'train': 0.8, 'test': 0.1}),
     ['camp.yaml:training.split_fractions: must sum to 1, got 0.9']),
    (lambda d: d['training'].update(mode='finetune'), ['camp.yaml:training.foundation: required with mode finetune']),
    (lambda d: d['classes'].pop('metals'),
     ['camp.yaml:transferability: needs at least 2 classes, the campaign has 1']),
    (lambda d: d['classes']['metals']['materials'].append({'formula': 'Si', 'prototype': 'diamond', 'a': 5.5}),
     ['camp.yaml:classes.metals.materials[1]: material name `si` is used twice']),
    (lambda d: d['classes']['metals']['materials'][0].pop('cubic'),
     ['camp.yaml:classes.metals.materials[0].sampling.rattle: rattling a 1-atom cell moves the atom with its images']),
    (lambda d: d['classes']['metals']['materials'][0].update(cubic=False, sampling={'supercell': [[1, -1, 0], [1, 1, 0],
                                                                                                [0, 0, 0]]}),
     ['camp.yaml:classes.metals.materials[0].sampling.supercell: the 3x3 matrix [[1, -1, 0], [1, 1, 0], [0, 0, 0]] '
      'must have a positive determinant',
      'camp.yaml:classes.metals.materials[0].sampling.rattle: rattling a 1-atom cell']),
    (lambda d: d['classes']['covalent']['materials'][0].update(sampling={'supercell': [2, 2]}),
     ['camp.yaml:classes.covalent.materials[0].sampling.supercell: must be 3 positive integers']),
    (lambda d: d['classes']['covalent']['materials'][0].update(file='missing.cif'),
     ['camp.yaml:classes.covalent.materials[0]: give either `file` or `formula`']),
])
def test_bad_campaign_names_the_key_and_the_problem(change, expected):
    errors = errors_of(modified(change))
    assert len(errors) == len(expected), errors
    for error, start in zip(errors, expected):
        assert error.startswith(start), (error, start)


def test_all_problems_are_reported_together():
    def change(data):
        data['training']['committee_size'] = 0
        data['dft'] = {'protocol': 'quick'}
        data['extra'] = 1

    errors = errors_of(modified(change))
    assert [error.split(':')[1] for error in errors] == ['extra', 'dft.protocol', 'training.committee_size']


def test_files_errors(tmp_path):
    with pytest.raises(CampaignError, match=r'nothing.yaml: no such file'):
        load_campaign(tmp_path / 'nothing.yaml')
    broken = tmp_path / 'broken.yaml'
    broken.write_text('name: x\nclasses: [a\n')
    with pytest.raises(CampaignError, match=r'broken.yaml:line 3: not valid YAML'):
        load_campaign(broken)
    relative = tmp_path / 'relative.yaml'
    data = modified(lambda d: d['classes']['covalent']['materials'][0].clear())
    data['classes']['covalent']['materials'][0]['file'] = 'si.cif'
    relative.write_text(yaml.safe_dump(data))
    with pytest.raises(CampaignError, match=rf'relative.yaml:classes.covalent.materials\[0\].file: no such file: '
                                            rf'{tmp_path}/si.cif'):
        load_campaign(relative)
    from ase.build import bulk

    bulk('Si', 'diamond', a=5.43).write(tmp_path / 'si.cif')
    assert load_campaign(relative)['materials']['si']['source'] == {'file': str(tmp_path / 'si.cif')}


# ---- the CLI in a profile: refusals exit 2 and create no process ---------------------------------------------
@pytest.fixture
def invoke(aiida_profile, pseudo_family, pw_code, mlip_codes):  # noqa: F811
    from click.testing import CliRunner

    from aiida_mlip.cli import cli

    def run(*arguments):
        return CliRunner().invoke(cli, ['-p', aiida_profile.name, *arguments])

    return run


def count_processes() -> int:
    from aiida import orm

    return orm.QueryBuilder().append(orm.ProcessNode).count()


def write(tmp_path, data) -> pathlib.Path:
    path = tmp_path / 'campaign.yaml'
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_refuses_elements_missing_from_the_family(invoke, tmp_path):
    def change(data):
        data['pseudo_family'] = 'PBE-test'
        data['classes']['metals']['materials'].append({'formula': 'Co', 'prototype': 'hcp', 'a': 2.51, 'c': 4.07})

    before = count_processes()
    for command in ('validate', 'run', 'submit'):
        result = invoke('campaign', command, str(write(tmp_path, modified(change))))
        assert result.exit_code == 2, result.output
        assert 'campaign.yaml:classes.metals.materials[1]: element Co is absent from the pseudo family `PBE-test`' \
            in result.output
    assert count_processes() == before


def test_cli_refuses_unknown_family_code_and_schema_errors(invoke, tmp_path):
    before = count_processes()
    result = invoke('campaign', 'run', str(write(tmp_path, modified(lambda d: d.update(pseudo_family='SSSP')))))
    assert result.exit_code == 2 and 'campaign.yaml:pseudo_family: pseudo family `SSSP` is not installed' \
        in result.output
    result = invoke('campaign', 'run', str(write(tmp_path, modified(
        lambda d: d.update(pseudo_family='PBE-test', codes={'evaluate': 'pw@localhost'})))))
    assert result.exit_code == 2 and 'campaign.yaml:codes.evaluate: code `pw@localhost` runs `quantumespresso.pw`' \
        in result.output
    result = invoke('campaign', 'submit', str(write(tmp_path, modified(lambda d: d['training'].update(seed=-1)))))
    assert result.exit_code == 2 and 'campaign.yaml:training.seed: must be >= 0, got -1' in result.output
    assert count_processes() == before


def test_cli_validate_accepts_the_test_campaign(invoke):
    result = invoke('campaign', 'validate', str(WORKFLOWS / 'si_ge_test.yaml'))
    assert result.exit_code == 0, result.output
    assert 'campaign `si_ge_test`: 2 class(es), elements Ge, Si; DFT `fast` with PBE-test at 20/160 Ry' \
        in result.output
    assert result.output.strip().endswith('valid')
