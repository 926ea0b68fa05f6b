"""Campaign files (YAML): load, check against the schema and normalise, before anything is stored or run.

Every problem is reported as ``FILE:KEY: problem`` (``KEY`` a dotted path such as ``classes.metals.materials[1].a``)
and all problems of a file are reported together. The schema itself is documented in docs/campaigns.md.

This module needs no AiiDA profile; :func:`profile_problems` checks what only a profile can tell (the pseudo family
covers every element, the codes and the foundation model exist) and :mod:`aiida_mlip.campaigns.builder` turns the
normalised campaign into a ``CampaignWorkChain`` builder.
"""
from __future__ import annotations

import difflib
import pathlib
import re

import numpy as np
import yaml

from aiida_mlip.protocols import protocol_file, validation_threshold_names

#: ase.build.bulk crystal structures a material may name as ``prototype``.
PROTOTYPES = ('sc', 'fcc', 'bcc', 'hcp', 'diamond', 'zincblende', 'rocksalt', 'cesiumchloride', 'fluorite',
              'wurtzite', 'tetragonal', 'bct', 'rhombohedral', 'orthorhombic')
VALIDATION_PROPERTIES = ('eos', 'elastic', 'phonons', 'md_stability')
TRAINING_MODES = ('scratch', 'finetune')
ELECTRONIC_TYPES = ('metal', 'insulator')
SPLITS = ('train', 'valid', 'test')
DEFAULT_CODES = {'pw': 'pw@localhost', 'mace_train': 'mace-train@localhost', 'evaluate': 'mlip-evaluate@localhost',
                 'md': 'mlip-md@localhost'}
NAME_PATTERN = re.compile(r'^[A-Za-z][A-Za-z0-9_-]*$')
DEFAULT_SAMPLING = {'volumes': [-0.04, 0.0, 0.04], 'rattle': {'amplitude': 0.05, 'count': 3, 'seed': 1}}


class CampaignError(ValueError):
    """A campaign file that cannot run; ``errors`` holds one ``FILE:KEY: problem`` line per problem."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__('\n'.join(self.errors))


def protocol_names(workflow: str) -> tuple[str, ...]:
    """The protocols defined in ``aiida_mlip/protocols/<workflow>.yaml``."""
    return tuple(protocol_file(workflow)['protocols'])


class _Checker:
    """Collects ``FILE:KEY: problem`` lines while the sections are read."""

    def __init__(self, filename: str):
        self.filename = filename
        self.errors: list[str] = []

    def error(self, key: str, problem: str):
        self.errors.append(f'{self.filename}:{key}: {problem}')

    def mapping(self, value, key: str, allowed: dict, required=()) -> dict:
        """``value`` as a dict whose keys are among ``allowed`` (name -> description); unknown keys get a guess."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.error(key, f'must be a mapping with keys {sorted(allowed)}, got {_type_name(value)}')
            return {}
        for name in value:
            if name not in allowed:
                guess = difflib.get_close_matches(str(name), list(allowed), n=1)
                hint = f'did you mean `{guess[0]}`?' if guess else f'allowed: {", ".join(sorted(allowed))}'
                self.error(_join(key, name), f'unknown key; {hint}')
        for name in required:
            if value.get(name) is None:
                self.error(_join(key, name), f'required ({allowed[name]})')
        return value

    def number(self, value, key: str, positive=False, integer=False, low=None, high=None):
        """``value`` if it is a number of the asked kind, else None (and an error)."""
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            self.error(key, f'must be {"an integer" if integer else "a number"}, got {_type_name(value)} {value!r}')
            return None
        if positive and value <= 0:
            self.error(key, f'must be > 0, got {value}')
            return None
        if low is not None and value < low or high is not None and value > high:
            bounds = f'lie in [{low}, {high}]' if low is not None and high is not None else (
                f'be >= {low}' if low is not None else f'be <= {high}')
            self.error(key, f'must {bounds}, got {value}')
            return None
        return value

    def string(self, value, key: str, choices=None):
        if not isinstance(value, str):
            self.error(key, f'must be a string, got {_type_name(value)} {value!r}')
            return None
        if choices is not None and value not in choices:
            guess = difflib.get_close_matches(value, list(choices), n=1)
            hint = f'; did you mean `{guess[0]}`?' if guess else ''
            self.error(key, f'`{value}` is not one of {", ".join(choices)}{hint}')
            return None
        return value

    def boolean(self, value, key: str):
        if not isinstance(value, bool):
            self.error(key, f'must be true or false, got {_type_name(value)} {value!r}')
            return None
        return value

    def protocol(self, value, key: str, workflow: str):
        return self.string(value, key, choices=protocol_names(workflow))

    def number_list(self, value, key: str, length=None, low=None, high=None, nonempty=True):
        if not isinstance(value, list) or (nonempty and not value):
            self.error(key, f'must be a {"non-empty " if nonempty else ""}list of numbers, got {value!r}')
            return None
        if length is not None and len(value) != length:
            self.error(key, f'must have {length} entries, got {len(value)}')
            return None
        numbers = [self.number(item, f'{key}[{index}]', low=low, high=high) for index, item in enumerate(value)]
        return None if any(item is None for item in numbers) else numbers


def _join(key: str, name) -> str:
    return f'{key}.{name}' if key else str(name)


def _type_name(value) -> str:
    return {dict: 'a mapping', list: 'a list', str: 'a string', bool: 'a boolean', type(None): 'nothing'}.get(
        type(value), type(value).__name__)


# ---- sections ------------------------------------------------------------------------------------------------
TOP_KEYS = {
    'name': 'campaign name: letters, digits, _ and -',
    'description': 'free text',
    'pseudo_family': 'label of an installed pseudopotential family (default PBE-QE-local)',
    'codes': 'labels of the pw, mace_train, evaluate and md codes',
    'resources': 'scheduler options of the jobs of each code: {pw, mace_train, evaluate}',
    'dft': 'DFT settings shared by every class',
    'sampling': 'default sampling of every material',
    'classes': 'material classes: label -> {materials, sampling}',
    'training': 'training from scratch or fine-tuning',
    'validation': 'properties validated against DFT per class',
    'transferability': 'per-class models evaluated on every class',
    'refinement': 'validate, label where it fails, retrain, until the validation passes (needs `validation`)',
}
DFT_KEYS = {
    'protocol': f'labeling protocol ({", ".join(protocol_names("labeling"))})',
    'ecutwfc': 'wavefunction cutoff in Ry (default: the family\'s largest recommendation over all elements)',
    'ecutrho': 'charge-density cutoff in Ry (default: as ecutwfc)',
    'kpoints_distance': 'k-point spacing in 1/Å (default: the protocol\'s)',
    'electronic_type': 'metal (smearing) or insulator (fixed occupations)',
    'isolated_atoms': 'label each element alone in a box (E0 references for MACE)',
    'max_failure_fraction': 'largest tolerated fraction of dropped frames per class',
    'max_concurrent': 'largest number of pw.x runs of one labeling in flight at once (default: all)',
    'parameters': 'pw.x input on top of the protocol: {SYSTEM: {...}, ELECTRONS: {...}} (e.g. nbnd, mixing_beta)',
}
#: pw.x namelists a campaign may add to, and the keys in them that the campaign sets itself (and why).
PW_NAMELISTS = ('SYSTEM', 'ELECTRONS')
PW_KEYS_SET_ELSEWHERE = {
    'ecutwfc': 'dft.ecutwfc', 'ecutrho': 'dft.ecutrho', 'occupations': 'dft.electronic_type',
    'nspin': 'spin-polarised labels are not offered (docs/campaigns.md)', 'conv_thr': 'the protocol, per atom',
    'nat': 'the structure', 'ntyp': 'the structure', 'ibrav': 'the structure', 'celldm': 'the structure',
}
#: Jobs a campaign's ``resources`` section sets options for; ``evaluate`` also covers the model's relax and MD jobs.
RESOURCE_JOBS = {'pw': 'pw.x jobs (labels and the DFT reference)', 'mace_train': 'training jobs',
                 'evaluate': 'jobs that run a model: evaluate, relax and MD'}
#: Keys of one job kind's ``resources`` entry (each a ``metadata.options`` key) -> description; the two ``num_``
#: counts form ``options.resources``.
RESOURCE_KEYS = {
    'num_machines': 'nodes per job',
    'num_mpiprocs_per_machine': 'MPI processes per node',
    'max_wallclock_seconds': 'time limit of each job, in seconds (SLURM --time)',
    'queue_name': 'partition (SLURM) or queue',
    'account': 'account charged (SLURM --account)',
    'qos': 'quality of service (SLURM --qos)',
    'max_memory_kb': 'memory per node in kB (SLURM --mem)',
    'custom_scheduler_commands': 'extra lines of the job script header, e.g. `#SBATCH --gres=gpu:1`',
}
SAMPLING_KEYS = {
    'volumes': 'relative volume changes, e.g. [-0.04, 0, 0.04]',
    'rattle': '{amplitude (Å), count, seed}',
    'strains': 'list of Voigt-6 strains [xx, yy, zz, yz, xz, xy]',
    'supercell': '3 repetitions or a 3x3 integer matrix, applied before sampling',
}
RATTLE_KEYS = {'amplitude': 'Gaussian displacement (Å)', 'count': 'number of cells', 'seed': 'random seed'}
MATERIAL_KEYS = {
    'name': 'key of the material (default: the formula in lower case)',
    'formula': 'chemical formula for ase.build.bulk, e.g. Si or GaAs',
    'prototype': f'crystal structure: {", ".join(PROTOTYPES)}',
    'a': 'lattice constant (Å)',
    'c': 'second lattice constant (Å; hcp, wurtzite, tetragonal)',
    'cubic': 'conventional cubic cell instead of the primitive one',
    'file': 'structure file (any format ase.io.read knows), relative to the campaign file',
    'sampling': 'sampling of this material (replaces the class/campaign sampling key by key)',
}
CLASS_KEYS = {'materials': 'list of materials', 'sampling': 'sampling of the materials of this class'}
TRAINING_KEYS = {
    'mode': 'scratch or finetune',
    'protocol': f'training protocol ({", ".join(protocol_names("training"))})',
    'committee_size': 'number of models trained with different seeds',
    'seed': 'seed of the split (member i trains with seed + i)',
    'split_fractions': '{train, valid, test} fractions summing to 1',
    'mace': 'mace_run_train options on top of the protocol\'s',
    'foundation': 'finetune only: pk, UUID or label of the mlip.model to fine-tune',
}
VALIDATION_KEYS = {
    'protocol': f'validation protocol ({", ".join(protocol_names("validation"))})',
    'properties': f'subset of {", ".join(VALIDATION_PROPERTIES)}',
    'thresholds': 'pass/fail limits on top of the protocol\'s',
    'relax': 'relax with DFT first and validate on the DFT-relaxed structure (default: the protocol\'s)',
}
TRANSFERABILITY_KEYS = {
    'enabled': 'run the transferability matrix (needs >= 2 classes)',
    'train_all': 'also train one model on all classes',
    'leave_one_out': 'also train one model per left-out class',
    'test_fraction': 'fraction of each class kept as its test set',
    'seed': 'seed of the per-class test split',
    'validate': 'validate the per-class models on each class\'s first material',
}
REFINEMENT_KEYS = {
    'protocol': f'refinement protocol ({", ".join(protocol_names("refinement"))}): budgets and targeted cells',
    'max_iterations': 'largest number of label -> retrain -> validate iterations after the first validation',
    'max_new_labels': 'budget of new DFT labels over all iterations',
    'cells_per_check': 'new cells per failed property per iteration: {eos, elastic, phonons, md_stability}',
    'seed': 'seed of the targeted cells and MD',
    'retrain': 'how each later iteration trains: `previous` (go on from the previous models) or `scratch`',
}
REFINEMENT_SECTIONS = ('eos', 'elastic', 'phonons', 'md_stability')


def load_campaign(path) -> dict:
    """Read and check a campaign file; the normalised campaign (plain JSON types) or a :class:`CampaignError`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CampaignError([f'{path}: no such file'])
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8'))
    except yaml.YAMLError as exception:
        mark = getattr(exception, 'problem_mark', None)
        where = f'line {mark.line + 1}' if mark is not None else 'YAML'
        raise CampaignError([f'{path}:{where}: not valid YAML ({getattr(exception, "problem", exception)})']) from None
    return check_campaign(data, str(path), base_dir=path.parent)


def check_campaign(data, filename: str = '<campaign>', base_dir=None) -> dict:
    """Check a parsed campaign mapping; returns the normalised campaign or raises :class:`CampaignError`."""
    checker = _Checker(filename)
    base_dir = pathlib.Path(base_dir or '.')
    data = checker.mapping(data, '', TOP_KEYS, required=('name', 'classes'))
    campaign = {'description': data.get('description') or ''}
    if data.get('name') is not None and checker.string(data['name'], 'name') is not None:
        if not NAME_PATTERN.match(data['name']):
            checker.error('name', f'`{data["name"]}` must start with a letter and hold only letters, digits, _ and -')
        campaign['name'] = data['name']
    campaign['pseudo_family'] = checker.string(data.get('pseudo_family', 'PBE-QE-local'), 'pseudo_family')
    codes = checker.mapping(data.get('codes'), 'codes', {key: f'label of the {key} code' for key in DEFAULT_CODES})
    campaign['codes'] = {key: checker.string(codes.get(key, default), f'codes.{key}')
                         for key, default in DEFAULT_CODES.items()}
    campaign['resources'] = _check_resources(checker, data.get('resources'))
    campaign['dft'] = _check_dft(checker, data.get('dft'))
    default_sampling = _check_sampling(checker, data.get('sampling', DEFAULT_SAMPLING), 'sampling')
    campaign['classes'], campaign['materials'] = _check_classes(checker, data.get('classes'), default_sampling,
                                                                base_dir)
    campaign['training'] = _check_training(checker, data.get('training'))
    campaign['validation'] = _check_validation(checker, data.get('validation'))
    campaign['transferability'] = _check_transferability(checker, data.get('transferability'),
                                                         len(campaign['classes']))
    if (campaign['transferability'] or {}).get('validate') and campaign['validation'] is None:
        checker.error('transferability.validate', 'needs a `validation` section (its properties and protocol)')
    campaign['refinement'] = _check_refinement(checker, data.get('refinement'))
    if campaign['refinement'] is not None and campaign['validation'] is None:
        checker.error('refinement', 'needs a `validation` section: its verdict decides what is labeled next')
    if campaign['refinement'] is not None and campaign['transferability'] is not None:
        checker.error('refinement', 'cannot be combined with `transferability` in one campaign: run two campaigns')
    if checker.errors:
        raise CampaignError(checker.errors)
    campaign['elements'] = sorted({e for material in campaign['materials'].values() for e in material['elements']})
    return campaign


def _check_resources(checker: _Checker, value) -> dict:
    """``resources``: per job kind, the ``metadata.options`` of its CalcJobs (only the kinds the file names)."""
    value = checker.mapping(value, 'resources', RESOURCE_JOBS)
    resources = {}
    for job, entry in value.items():
        key = f'resources.{job}'
        if job not in RESOURCE_JOBS:
            continue
        entry = checker.mapping(entry, key, RESOURCE_KEYS)
        options, counts = {}, {}
        for name, setting in entry.items():
            if name in ('num_machines', 'num_mpiprocs_per_machine', 'max_wallclock_seconds', 'max_memory_kb'):
                number = checker.number(setting, f'{key}.{name}', integer=True, positive=True)
                (counts if name.startswith('num_') else options)[name] = number
            elif name in RESOURCE_KEYS:
                options[name] = checker.string(setting, f'{key}.{name}')
        if counts:
            options['resources'] = {'num_machines': 1, **counts}
        resources[job] = options
    return resources


def _check_dft(checker: _Checker, value) -> dict:
    value = checker.mapping(value, 'dft', DFT_KEYS)
    dft = {
        'protocol': checker.protocol(value.get('protocol', 'fast'), 'dft.protocol', 'labeling'),
        'electronic_type': checker.string(value.get('electronic_type', 'metal'), 'dft.electronic_type',
                                          ELECTRONIC_TYPES),
        'isolated_atoms': checker.boolean(value.get('isolated_atoms', True), 'dft.isolated_atoms'),
    }
    for key in ('ecutwfc', 'ecutrho', 'kpoints_distance'):
        if value.get(key) is not None:
            dft[key] = checker.number(value[key], f'dft.{key}', positive=True)
    if value.get('max_failure_fraction') is not None:
        dft['max_failure_fraction'] = checker.number(value['max_failure_fraction'], 'dft.max_failure_fraction',
                                                     low=0, high=1)
    if value.get('max_concurrent') is not None:
        dft['max_concurrent'] = checker.number(value['max_concurrent'], 'dft.max_concurrent', integer=True, low=1)
    if value.get('parameters') is not None:
        dft['parameters'] = _check_pw_parameters(checker, value['parameters'])
    if (dft.get('ecutwfc') is None) != (dft.get('ecutrho') is None):
        checker.error('dft', 'give both ecutwfc and ecutrho, or neither (then the family\'s recommendation is used)')
    elif dft.get('ecutwfc') and dft.get('ecutrho') and dft['ecutrho'] < 4 * dft['ecutwfc']:
        checker.error('dft.ecutrho', f'must be >= 4 x ecutwfc = {4 * dft["ecutwfc"]} Ry, got {dft["ecutrho"]}')
    return dft


def _check_pw_parameters(checker: _Checker, value) -> dict:
    """``dft.parameters``: namelists of scalar pw.x settings, none of those the campaign sets by other keys."""
    value = checker.mapping(value, 'dft.parameters', {name: 'pw.x namelist' for name in PW_NAMELISTS})
    parameters = {}
    for namelist, entries in value.items():
        key = f'dft.parameters.{namelist}'
        if namelist not in PW_NAMELISTS:
            continue
        if not isinstance(entries, dict):
            checker.error(key, f'must be a mapping of pw.x keys, got {_type_name(entries)}')
            continue
        for name, setting in entries.items():
            if name in PW_KEYS_SET_ELSEWHERE:
                checker.error(f'{key}.{name}', f'set by {PW_KEYS_SET_ELSEWHERE[name]}, not here')
            elif not isinstance(setting, (int, float, str, bool)):
                checker.error(f'{key}.{name}', f'must be a number, string or true/false, got {_type_name(setting)}')
            else:
                parameters.setdefault(namelist, {})[name] = setting
    return parameters


def _check_sampling(checker: _Checker, value, key: str, base=None) -> dict:
    """A sampling mapping; keys missing here are taken from ``base`` (the enclosing sampling)."""
    value = checker.mapping(value, key, SAMPLING_KEYS)
    sampling = dict(base or {})
    if 'volumes' in value:
        volumes = checker.number_list(value['volumes'], f'{key}.volumes', nonempty=False)
        if volumes is not None:
            if any(v <= -0.5 or v >= 0.5 for v in volumes):
                checker.error(f'{key}.volumes', f'relative volume changes must lie in (-0.5, 0.5), got {volumes}')
            elif len(set(volumes)) != len(volumes):
                checker.error(f'{key}.volumes', f'must be distinct, got {volumes}')
        sampling['volumes'] = volumes or []
    if 'rattle' in value:
        if value['rattle'] is None:
            sampling['rattle'] = None
        else:
            rattle = checker.mapping(value['rattle'], f'{key}.rattle', RATTLE_KEYS, required=('amplitude', 'count'))
            sampling['rattle'] = {
                'amplitude': checker.number(rattle.get('amplitude', 0.05), f'{key}.rattle.amplitude', positive=True,
                                            high=0.5),
                'count': checker.number(rattle.get('count', 1), f'{key}.rattle.count', positive=True, integer=True),
                'seed': checker.number(rattle.get('seed', 1), f'{key}.rattle.seed', integer=True, low=0),
            }
    if 'strains' in value:
        strains = value['strains'] or []
        if not isinstance(strains, list):
            checker.error(f'{key}.strains', f'must be a list of Voigt-6 strains, got {strains!r}')
            strains = []
        sampling['strains'] = [checker.number_list(strain, f'{key}.strains[{index}]', length=6, low=-0.2, high=0.2)
                               for index, strain in enumerate(strains)]
    if 'supercell' in value:
        repetitions = value['supercell']
        problem = supercell_problem(repetitions) if repetitions is not None else None
        if problem:
            checker.error(f'{key}.supercell', problem)
            repetitions = None
        sampling['supercell'] = repetitions
    return sampling


def supercell_problem(value) -> str | None:
    """Why ``value`` is neither 3 positive integers nor a 3x3 integer matrix with a positive determinant."""
    def integers(row):
        return isinstance(row, list) and len(row) == 3 and all(
            isinstance(n, int) and not isinstance(n, bool) for n in row)

    if integers(value) and all(n >= 1 for n in value):
        return None
    if isinstance(value, list) and len(value) == 3 and all(integers(row) for row in value):
        if round(np.linalg.det(np.array(value))) >= 1:
            return None
        return f'the 3x3 matrix {value!r} must have a positive determinant (the number of cells it holds)'
    return (f'must be 3 positive integers, e.g. [2, 2, 2], or a 3x3 integer matrix of the new cell vectors in the old '
            f'ones, e.g. [[1, -1, 0], [1, 1, 0], [0, 0, 1]]; got {value!r}')


def supercell_size(value) -> int:
    """The number of cells a valid ``supercell`` entry (3 repetitions or a 3x3 matrix) holds."""
    matrix = np.array(value)
    return round(np.linalg.det(np.diag(matrix) if matrix.ndim == 1 else matrix))


def _check_classes(checker: _Checker, value, default_sampling: dict, base_dir: pathlib.Path):
    classes, materials = {}, {}
    if value is None:
        return classes, materials
    if not isinstance(value, dict) or not value:
        checker.error('classes', f'must map class labels to {{materials: [...]}}, got {value!r}')
        return classes, materials
    for label, entry in value.items():
        key = f'classes.{label}'
        if not isinstance(label, str) or not NAME_PATTERN.match(label):
            checker.error(key, 'a class label must start with a letter and hold only letters, digits, _ and -')
            continue
        entry = checker.mapping(entry, key, CLASS_KEYS, required=('materials',))
        sampling = _check_sampling(checker, entry.get('sampling', {}), f'{key}.sampling', default_sampling)
        items = entry.get('materials')
        if items is None:
            continue
        if not isinstance(items, list) or not items:
            checker.error(f'{key}.materials', f'must be a non-empty list of materials, got {items!r}')
            continue
        classes[label] = []
        for index, item in enumerate(items):
            material = _check_material(checker, item, f'{key}.materials[{index}]', sampling, base_dir)
            if material is None:
                continue
            name = material.pop('name')
            if name in materials:
                checker.error(f'{key}.materials[{index}]', f'material name `{name}` is used twice: give `name:`')
                continue
            material['class'] = label
            materials[name] = material
            classes[label].append(name)
    return classes, materials


def _check_material(checker: _Checker, value, key: str, sampling: dict, base_dir: pathlib.Path):
    value = checker.mapping(value, key, MATERIAL_KEYS)
    if not value:
        if not checker.errors or not checker.errors[-1].startswith(f'{checker.filename}:{key}'):
            checker.error(key, 'a material needs `formula` + `prototype` + `a`, or `file`')
        return None
    if 'file' in value and 'formula' in value:
        checker.error(key, 'give either `file` or `formula` + `prototype`, not both')
        return None
    source = {}
    if 'file' in value:
        if checker.string(value['file'], f'{key}.file') is None:
            return None
        path = (base_dir / value['file']).resolve()
        if not path.is_file():
            checker.error(f'{key}.file', f'no such file: {path}')
            return None
        source = {'file': str(path)}
    else:
        for name in ('formula', 'prototype', 'a'):
            if name not in value:
                checker.error(f'{key}.{name}', f'required ({MATERIAL_KEYS[name]})')
        formula = checker.string(value.get('formula', ''), f'{key}.formula') if 'formula' in value else None
        prototype = checker.string(value['prototype'], f'{key}.prototype', PROTOTYPES) if 'prototype' in value \
            else None
        a = checker.number(value['a'], f'{key}.a', positive=True) if 'a' in value else None
        if None in (formula, prototype, a):
            return None
        source = {'formula': formula, 'prototype': prototype, 'a': float(a)}
        if 'c' in value:
            c = checker.number(value['c'], f'{key}.c', positive=True)
            if c is None:
                return None
            source['c'] = float(c)
        if 'cubic' in value and checker.boolean(value['cubic'], f'{key}.cubic'):
            source['cubic'] = True
    try:
        atoms = material_atoms(source)
    except Exception as exception:  # noqa: BLE001  (ase raises many kinds; all mean the same to the user)
        checker.error(key, f'cannot build the structure: {exception}')
        return None
    name = value.get('name') or source.get('formula', pathlib.Path(source.get('file', 'x')).stem).lower()
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        checker.error(f'{key}.name', f'`{name}` must start with a letter and hold only letters, digits, _ and -')
        return None
    problem = _atoms_problem(atoms)
    if problem:
        checker.error(key, problem)
        return None
    material_sampling = _check_sampling(checker, value.get('sampling', {}), f'{key}.sampling', sampling)
    if not material_sampling.get('volumes') and not material_sampling.get('rattle') and \
            not material_sampling.get('strains'):
        checker.error(f'{key}.sampling', 'samples no cell: give volumes, rattle or strains')
    repetitions = material_sampling.get('supercell') or (1, 1, 1)
    if material_sampling.get('rattle') and len(atoms) * supercell_size(repetitions) == 1:
        checker.error(f'{key}.sampling.rattle', 'rattling a 1-atom cell moves the atom with its images: every force '
                                                 'stays zero. Use `cubic: true` or `supercell: [2, 2, 2]`')
    return {'name': name, 'source': source, 'elements': sorted(set(atoms.get_chemical_symbols())),
            'n_atoms': len(atoms), 'sampling': material_sampling}


def _atoms_problem(atoms) -> str | None:
    from aiida_mlip.workflows.checks import MIN_INTERATOMIC_DISTANCE, closest_pair

    distance, i, j = closest_pair(atoms)
    if distance < MIN_INTERATOMIC_DISTANCE:
        return f'atoms {i} and {j} are {distance:.3f} Å apart (closer than {MIN_INTERATOMIC_DISTANCE} Å): check `a`'
    return None


def material_atoms(source: dict):
    """The ase.Atoms of a normalised material ``source`` (``file``, or ``formula``/``prototype``/``a``[/``c``])."""
    if 'file' in source:
        import ase.io

        return ase.io.read(source['file'])
    from ase.build import bulk

    kwargs = {'a': source['a'], 'cubic': source.get('cubic', False)}
    if 'c' in source:
        kwargs['c'] = source['c']
    return bulk(source['formula'], source['prototype'], **kwargs)


def _check_training(checker: _Checker, value) -> dict:
    value = checker.mapping(value, 'training', TRAINING_KEYS)
    training = {
        'mode': checker.string(value.get('mode', 'scratch'), 'training.mode', TRAINING_MODES),
        'protocol': checker.protocol(value.get('protocol', 'fast'), 'training.protocol', 'training'),
        'committee_size': checker.number(value.get('committee_size', 1), 'training.committee_size', positive=True,
                                         integer=True),
        'seed': checker.number(value.get('seed', 1), 'training.seed', integer=True, low=0),
        'mace': value.get('mace') or {},
    }
    if not isinstance(training['mace'], dict):
        checker.error('training.mace', f'must be a mapping of mace_run_train options, got {training["mace"]!r}')
        training['mace'] = {}
    if 'split_fractions' in value:
        fractions = checker.mapping(value['split_fractions'], 'training.split_fractions',
                                    {name: f'{name} fraction' for name in SPLITS}, required=('train',))
        numbers = {name: checker.number(fractions[name], f'training.split_fractions.{name}', low=0, high=1)
                   for name in SPLITS if name in fractions}
        if None not in numbers.values() and numbers:
            if abs(sum(numbers.values()) - 1) > 1e-6:
                checker.error('training.split_fractions', f'must sum to 1, got {sum(numbers.values()):g}')
            training['split_fractions'] = numbers
    for name in training['mace']:
        if not isinstance(name, str) or name.startswith('-'):
            checker.error(f'training.mace.{name}', 'mace options are written without leading dashes')
    if training['mode'] == 'finetune':
        if value.get('foundation') is None:
            checker.error('training.foundation', 'required with mode finetune (pk, UUID or label of an mlip.model)')
        else:
            training['foundation'] = str(value['foundation'])
    elif value.get('foundation') is not None:
        checker.error('training.foundation', 'only used with `mode: finetune`')
    return training


def _check_validation(checker: _Checker, value) -> dict | None:
    if value is None:
        return None
    value = checker.mapping(value, 'validation', VALIDATION_KEYS, required=('properties',))
    validation = {'protocol': checker.protocol(value.get('protocol', 'fast'), 'validation.protocol', 'validation')}
    properties = value.get('properties')
    if properties is not None:
        if not isinstance(properties, list) or not properties:
            checker.error('validation.properties', f'must be a non-empty list of {", ".join(VALIDATION_PROPERTIES)}')
        else:
            validation['properties'] = [checker.string(item, f'validation.properties[{index}]', VALIDATION_PROPERTIES)
                                        for index, item in enumerate(properties)]
    thresholds = checker.mapping(value.get('thresholds'), 'validation.thresholds',
                                 {name: 'pass/fail limit' for name in validation_threshold_names()})
    validation['thresholds'] = {name: checker.number(limit, f'validation.thresholds.{name}', positive=True)
                                for name, limit in thresholds.items() if name in validation_threshold_names()}
    if value.get('relax') is not None:
        validation['relax'] = checker.boolean(value['relax'], 'validation.relax')
    return validation


def _check_transferability(checker: _Checker, value, n_classes: int) -> dict | None:
    if value is None:
        return None
    value = checker.mapping(value, 'transferability', TRANSFERABILITY_KEYS)
    if not checker.boolean(value.get('enabled', True), 'transferability.enabled'):
        return None
    settings = {
        'train_all': checker.boolean(value.get('train_all', True), 'transferability.train_all'),
        'leave_one_out': checker.boolean(value.get('leave_one_out', False), 'transferability.leave_one_out'),
        'validate': checker.boolean(value.get('validate', False), 'transferability.validate'),
        'test_fraction': checker.number(value.get('test_fraction', 0.25), 'transferability.test_fraction',
                                        positive=True, high=0.5),
        'seed': checker.number(value.get('seed', 1), 'transferability.seed', integer=True, low=0),
    }
    if n_classes and n_classes < 2:
        checker.error('transferability', f'needs at least 2 classes, the campaign has {n_classes}: remove the '
                                         'section or add a class')
    return settings


def _check_refinement(checker: _Checker, value) -> dict | None:
    """The refinement settings: the protocol's budgets unless given (RefinementWorkChain inputs)."""
    if value is None:
        return None
    value = checker.mapping(value, 'refinement', REFINEMENT_KEYS)
    settings = {'protocol': checker.protocol(value.get('protocol', 'fast'), 'refinement.protocol', 'refinement')}
    for name in ('max_iterations', 'max_new_labels', 'seed'):
        if name in value:
            settings[name] = checker.number(value[name], f'refinement.{name}', integer=True,
                                            low=1 if name == 'max_new_labels' else 0)
    if 'retrain' in value:
        settings['retrain'] = checker.string(value['retrain'], 'refinement.retrain', choices=('previous', 'scratch'))
    if 'cells_per_check' in value:
        counts = checker.mapping(value['cells_per_check'], 'refinement.cells_per_check',
                                 {name: f'new cells when {name} fails' for name in REFINEMENT_SECTIONS})
        settings['cells_per_check'] = {name: checker.number(count, f'refinement.cells_per_check.{name}',
                                                            integer=True, low=0) for name, count in counts.items()}
    return settings


# ---- checks that need a profile ------------------------------------------------------------------------------
def profile_problems(campaign: dict, filename: str = '<campaign>') -> list[str]:
    """What the loaded profile cannot provide: family and its elements, codes and their plugins, the foundation."""
    from aiida import orm
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    from aiida_mlip.workflows.checks import code_problem
    from aiida_mlip.workflows.labeling import load_pseudo_family

    errors = []
    try:
        family = load_pseudo_family(campaign['pseudo_family'])
    except ValueError as exception:
        errors.append(f'{filename}:pseudo_family: {exception}')
    else:
        covered = set(family.elements)
        for label, names in campaign['classes'].items():
            for index, name in enumerate(names):
                missing = sorted(set(campaign['materials'][name]['elements']) - covered)
                if missing:
                    errors.append(
                        f'{filename}:classes.{label}.materials[{index}]: element {", ".join(missing)} is absent from '
                        f'the pseudo family `{family.label}` (it covers {", ".join(sorted(covered))})')
    plugins = {'pw': 'quantumespresso.pw', 'mace_train': 'mlip.mace_train', 'evaluate': 'mlip.evaluate',
               'md': 'mlip.md'}
    needed = ['pw', 'mace_train', 'evaluate'] + (
        ['md'] if 'md_stability' in (campaign.get('validation') or {}).get('properties', []) else [])
    for key in needed:
        label = campaign['codes'][key]
        try:
            code = orm.load_code(label)
        except (NotExistent, MultipleObjectsError, ValueError) as exception:
            errors.append(f'{filename}:codes.{key}: no code `{label}` ({exception}); run `aiida-mlip setup`')
            continue
        problem = code_problem(code, plugins[key], f'codes.{key}')
        if problem:
            errors.append(f'{filename}:codes.{key}: {problem}')
    if campaign['training'].get('foundation'):
        try:
            foundation = load_foundation_model(campaign['training']['foundation'])
        except ValueError as exception:
            errors.append(f'{filename}:training.foundation: {exception}')
        else:
            missing = foundation.covers(campaign['elements'])
            if missing:
                errors.append(f'{filename}:training.foundation: MlipModel<{foundation.pk}> covers '
                              f'{", ".join(foundation.elements)}, not {", ".join(missing)}: naive fine-tuning cannot '
                              'add elements')
    return errors


def load_foundation_model(identifier: str):
    """The mlip.model named by pk, UUID, label or sha256 prefix (as ``aiida-mlip model show``), or a ValueError."""
    from aiida_mlip.data.model import MlipModel

    return MlipModel.find(identifier)
