"""Calcfunctions that make, split and merge ``mlip.dataset`` nodes, so every dataset has a creator in the graph."""
from __future__ import annotations

import collections

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_mlip.data.dataset import (
    ISOLATED_ATOM, TrainingSet, concatenate_arrays, fingerprint_differences,
)

#: GPa -> eV/Å³
GPA_TO_EV_PER_A3 = 1.0 / 160.21766208

SPLIT_NAMES = ('train', 'valid', 'test')


def frame_link_prefix(index: int) -> str:
    """Link-label prefix of the nodes of frame ``index`` in :func:`collect_labeled_frames`."""
    return f'frame_{index:05d}'


@calcfunction
def collect_labeled_frames(settings: orm.Dict, **frames) -> TrainingSet:
    """Turn PwBaseWorkChain outputs into one ``mlip.dataset``.

    ``frames`` holds, per frame ``frame_NNNNN``: ``_structure`` (the input StructureData), ``_parameters``
    (``output_parameters``) and ``_trajectory`` (``output_trajectory``). ``settings`` holds ``config_types``
    (list, one per frame) and ``fingerprint``. The source of each frame is the PwCalculation that created its
    ``output_parameters``. Stress goes from QE's sign and GPa to ASE's sign and eV/Å³.
    """
    settings = settings.get_dict()
    config_types = settings['config_types']
    atoms_list, sources = [], []
    for index, config_type in enumerate(config_types):
        prefix = frame_link_prefix(index)
        structure = frames[f'{prefix}_structure']
        parameters = frames[f'{prefix}_parameters']
        trajectory = frames[f'{prefix}_trajectory']
        atoms = structure.get_ase()
        atoms.info['REF_energy'] = float(parameters['energy'])
        atoms.info['config_type'] = config_type
        if 'forces' in trajectory.get_arraynames():
            atoms.arrays['REF_forces'] = trajectory.get_array('forces')[-1]
        if config_type != ISOLATED_ATOM and 'stress' in trajectory.get_arraynames():
            atoms.info['REF_stress'] = -trajectory.get_array('stress')[-1] * GPA_TO_EV_PER_A3
        atoms_list.append(atoms)
        sources.append(parameters.creator.uuid)
    return TrainingSet.from_ase(atoms_list, fingerprint=settings['fingerprint'], sources=sources)


def split_indices(n_frames: int, fractions: dict, seed: int, groups=None, always_train=(), strata=None) -> dict:
    """Seeded assignment of frame indices to splits.

    With ``groups`` (one key per frame, e.g. config_type or composition) whole groups go to one split, so
    no group leaks between training and test; groups are shuffled and filled in the order train, valid, test.
    ``always_train`` indices (IsolatedAtom frames: they define E0, they are not test data) go to train.
    Each unit (frame or group), in seeded random order, goes to the split furthest below its share.
    With ``strata`` (one key per frame, e.g. config_type; not with ``groups``) the splits get the same sizes, but
    each stratum is spread over them in proportion: a test set of a class sampled by volume scans and rattles then
    holds rattled frames too (volume-scan frames of symmetric cells have zero forces, so a test set of only those
    would score every model's forces as perfect).
    """
    names = [name for name in SPLIT_NAMES if fractions.get(name, 0) > 0]
    total = sum(fractions[name] for name in names)
    if not names or abs(total - 1.0) > 1e-6:
        raise ValueError(f'split fractions must be positive and sum to 1, got {fractions}')
    rng = np.random.default_rng(seed)
    always_train = set(always_train)
    candidates = [i for i in range(n_frames) if i not in always_train]
    units = [[i] for i in candidates]
    if groups is not None:
        keys = sorted({groups[i] for i in candidates})
        units = [[i for i in candidates if groups[i] == key] for key in keys]
    order = rng.permutation(len(units))
    result = {name: [] for name in names}
    targets = {name: fractions[name] * len(candidates) for name in names}
    if strata is not None:
        if groups is not None:
            raise ValueError('split by groups or by strata, not both')
        _split_stratified([units[position][0] for position in order], strata, names, targets, result)
    else:
        for position in order:
            # The split furthest below its share takes the next unit (ties: train, valid, test).
            name = max(names, key=lambda n: (targets[n] - len(result[n]), -names.index(n)))
            result[name].extend(units[position])
    result.setdefault('train', []).extend(sorted(always_train))
    return {name: sorted(indices) for name, indices in result.items()}


def _split_stratified(shuffled: list, strata, names: list, targets: dict, result: dict):
    """Fill ``result`` with the split sizes of the unstratified rule, each stratum spread evenly over the splits.

    The shuffled frames are ordered by their rank within their stratum (as a fraction of the stratum's size), so
    every stretch of that order holds each stratum in proportion; the splits then take consecutive stretches.
    """
    sizes = {name: 0 for name in names}
    for _ in shuffled:
        name = max(names, key=lambda n: (targets[n] - sizes[n], -names.index(n)))
        sizes[name] += 1
    totals = collections.Counter(strata[index] for index in shuffled)
    seen = collections.Counter()
    keyed = []
    for position, index in enumerate(shuffled):
        keyed.append(((seen[strata[index]] + 0.5) / totals[strata[index]], position, index))
        seen[strata[index]] += 1
    ordered = [index for *_, index in sorted(keyed)]
    start = 0
    for name in names:
        result[name].extend(ordered[start:start + sizes[name]])
        start += sizes[name]


@calcfunction
def split_dataset(dataset: TrainingSet, fractions: orm.Dict, seed: orm.Int, group_by: orm.Str = None,
                  stratify_by: orm.Str = None) -> dict:
    """Seeded split of a dataset into ``train``/``valid``/``test`` datasets (see :func:`split_indices`);
    ``stratify_by`` = ``config_type`` spreads every config type over the splits in proportion."""
    config = dataset.get_arrays()['config_type']
    strata = None
    if stratify_by is not None:
        if stratify_by.value != 'config_type':
            raise ValueError(f'stratify_by must be `config_type`, got `{stratify_by.value}`')
        strata = list(config)
    groups = None
    if group_by is not None:
        if group_by.value == 'config_type':
            groups = list(config)
        elif group_by.value == 'composition':
            groups = [frame.get_chemical_formula(mode='reduce') for frame in dataset.to_ase()]
        else:
            raise ValueError(f'group_by must be `config_type` or `composition`, got `{group_by.value}`')
    isolated = [i for i, c in enumerate(config) if c == ISOLATED_ATOM]
    indices = split_indices(len(dataset), fractions.get_dict(), seed.value, groups, always_train=isolated,
                            strata=strata)
    empty = [name for name, chosen in indices.items() if not chosen]
    if empty:
        raise ValueError(f'split {empty} would be empty: {len(dataset)} frames are too few for {fractions.get_dict()}')
    return {name: dataset.subset(chosen) for name, chosen in indices.items()}


def concatenated(named: dict, force: bool = False) -> TrainingSet:
    """One unstored dataset of ``named`` (key -> dataset, in key order); refuses other DFT settings unless ``force``."""
    nodes = [named[key] for key in sorted(named)]
    if not nodes:
        raise ValueError('nothing to merge')
    reference = nodes[0].fingerprint
    for key, node in zip(sorted(named), nodes):
        differences = fingerprint_differences(reference, node.fingerprint)
        if differences and not force:
            raise ValueError(
                f'dataset `{key}` was labeled with other DFT settings ({"; ".join(differences)}); '
                'mixing them corrupts training: relabel, or pass force=True'
            )
    fingerprint = dict(reference)
    fingerprint['pseudos'] = {k: v for node in nodes for k, v in (node.fingerprint.get('pseudos') or {}).items()}
    if any(fingerprint_differences(reference, node.fingerprint) for node in nodes):
        fingerprint['mixed'] = [node.fingerprint for node in nodes]
    arrays = concatenate_arrays([node.get_arrays() for node in nodes])
    sources = [source for node in nodes for source in node.source_uuids]
    return TrainingSet(arrays=arrays, fingerprint=fingerprint, sources=sources)


@calcfunction
def merge_datasets(force: orm.Bool = None, **datasets) -> TrainingSet:
    """Concatenate datasets; refuses ones labeled with different DFT settings unless ``force`` is True."""
    return concatenated(datasets, force is not None and force.value)


def extension_indices(sizes: dict, config_types: list, fractions: dict, seed: int) -> dict:
    """Which split each new frame joins: the one furthest below its share of the grown total (seeded order).

    ``sizes`` are the frame counts of the existing splits; they keep their frames. IsolatedAtom frames train.
    """
    names = [name for name in SPLIT_NAMES if fractions.get(name, 0) > 0]
    sizes = {name: sizes.get(name, 0) for name in names}
    total = sum(sizes.values()) + len(config_types)
    chosen = {name: [] for name in names}
    for index in np.random.default_rng(seed).permutation(len(config_types)):
        if config_types[index] == ISOLATED_ATOM:
            name = 'train'
        else:
            name = max(names, key=lambda n: (fractions[n] * total - sizes[n], -names.index(n)))
        sizes[name] += 1
        chosen[name].append(int(index))
    return {name: sorted(indices) for name, indices in chosen.items()}


@calcfunction
def extend_splits(fractions: orm.Dict, seed: orm.Int, new: TrainingSet, **splits) -> dict:
    """The ``splits`` (``train``/``valid``/``test`` datasets) with the frames of ``new`` added (seeded).

    Every earlier frame stays in its split, so a model trained on the earlier train split and trained further on the
    extended one is never scored on a frame it has seen, and the test errors of successive models share a test set.
    """
    config_types = list(new.get_arrays()['config_type'])
    chosen = extension_indices({name: node.n_frames for name, node in splits.items()}, config_types,
                               fractions.get_dict(), seed.value)
    extended = {}
    for name, indices in chosen.items():
        earlier = splits.get(name)
        if earlier is not None and indices:
            extended[name] = concatenated({'dataset_0': earlier, 'dataset_1': new.subset(indices)})
        elif earlier is not None:
            extended[name] = earlier.subset(range(earlier.n_frames))  # a calcfunction returns new nodes only
        elif indices:
            extended[name] = new.subset(indices)
    return extended


@calcfunction
def predictions_to_dataset(energies: orm.ArrayData, forces: orm.ArrayData, stresses: orm.ArrayData = None,
                           **structures) -> TrainingSet:
    """MLIP predictions (committee mean) of ``structures`` as an ``mlip.dataset``, like a DFT-labeled one.

    The rows of the arrays follow the sorted keys of ``structures`` (the order MlipEvaluateCalculation
    writes them). The source of every frame is the evaluation calculation; the fingerprint names the models.
    """
    keys = sorted(structures)
    n_atoms = energies.get_array('n_atoms')
    offsets = np.concatenate([[0], np.cumsum(n_atoms)])
    energy = energies.get_array('energy_mean')
    force = forces.get_array('forces_mean')
    stress = stresses.get_array('stress_mean') if stresses is not None else None
    if len(keys) != len(energy):
        raise ValueError(f'{len(energy)} predictions for {len(keys)} structures')
    atoms_list = []
    for index, key in enumerate(keys):
        atoms = structures[key].get_ase()
        if len(atoms) != n_atoms[index]:
            raise ValueError(f'structure `{key}` has {len(atoms)} atoms, the prediction {n_atoms[index]}')
        atoms.info['REF_energy'] = float(energy[index])
        atoms.arrays['REF_forces'] = force[offsets[index]:offsets[index + 1]]
        if stress is not None and all(atoms.pbc):
            atoms.info['REF_stress'] = stress[index]
        atoms.info['config_type'] = 'prediction'
        atoms_list.append(atoms)
    calculation = energies.creator
    models = sorted(link.node.uuid for link in calculation.base.links.get_incoming().all()
                    if link.link_label.startswith('models'))
    fingerprint = {'engine': 'mlip', 'models': models, 'calculation': calculation.uuid}
    return TrainingSet.from_ase(atoms_list, fingerprint=fingerprint, sources=[calculation.uuid] * len(atoms_list))
