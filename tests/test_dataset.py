"""`mlip.dataset` and its calcfunctions (split, merge), and the seeded sampling calcfunctions."""
import numpy as np
import pytest
from aiida import orm
from ase.build import bulk

from aiida_mlip.calculations.datasets import (
    extend_splits, extension_indices, merge_datasets, split_dataset, split_indices,
)
from aiida_mlip.calculations.sampling import (
    isolated_atom, make_supercell, rattle_structure, scale_volume, strain_structure,
)
from aiida_mlip.data.dataset import TrainingSet, fingerprint_differences

FINGERPRINT = {'functional': 'PBE', 'ecutwfc': 30.0, 'ecutrho': 240.0, 'kpoints_distance': 0.3,
               'occupations': 'smearing', 'smearing': 'cold', 'degauss': 0.02, 'nspin': 1, 'pseudos': {'Si': 'abc'}}


def frames(count, config_types=None, symbol='Si', seed=0):
    """Labeled frames with known values (labels are arbitrary numbers: these tests are about bookkeeping)."""
    rng = np.random.default_rng(seed)
    result = []
    for index in range(count):
        atoms = bulk(symbol, 'diamond', a=5.43 + 0.01 * index)
        atoms.info['REF_energy'] = -10.0 - index
        atoms.arrays['REF_forces'] = rng.normal(size=(len(atoms), 3))
        atoms.info['REF_stress'] = np.eye(3) * 0.001 * index
        atoms.info['config_type'] = (config_types or ['Default'] * count)[index]
        result.append(atoms)
    return result


def test_ase_round_trip_keeps_labels_and_sources():
    original = frames(3)
    dataset = TrainingSet.from_ase(original, fingerprint=FINGERPRINT, sources=['u1', 'u2', 'u3']).store()
    back = dataset.to_ase()
    assert dataset.n_frames == 3 and dataset.elements == ['Si'] and dataset.source_uuids == ['u1', 'u2', 'u3']
    for before, after in zip(original, back):
        assert after.info['REF_energy'] == before.info['REF_energy']
        assert np.allclose(after.arrays['REF_forces'], before.arrays['REF_forces'])
        assert np.allclose(after.info['REF_stress'], before.info['REF_stress'])
        assert np.allclose(after.cell, before.cell)
    voigt = frames(1)[0]
    voigt.info['REF_stress'] = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # xx yy zz yz xz xy
    stress = TrainingSet.from_ase([voigt]).to_ase()[0].info['REF_stress']
    assert stress[1, 2] == 4.0 and stress[0, 2] == 5.0 and stress[0, 1] == 6.0


def test_empty_and_unlabeled_datasets_are_refused():
    with pytest.raises(ValueError, match='at least one frame'):
        TrainingSet.from_ase([])
    unlabeled = bulk('Si', 'diamond', a=5.43)
    with pytest.raises(ValueError, match='no `REF_energy` label'):
        TrainingSet.from_ase([unlabeled])


def test_split_is_seeded_complete_and_disjoint():
    first = split_indices(20, {'train': 0.8, 'valid': 0.1, 'test': 0.1}, seed=3)
    assert first == split_indices(20, {'train': 0.8, 'valid': 0.1, 'test': 0.1}, seed=3)
    assert first != split_indices(20, {'train': 0.8, 'valid': 0.1, 'test': 0.1}, seed=4)
    assert sorted(i for part in first.values() for i in part) == list(range(20))
    assert [len(first[name]) for name in ('train', 'valid', 'test')] == [16, 2, 2]


@pytest.mark.parametrize('seed', range(6))
def test_stratified_split_spreads_every_config_type_over_the_splits(seed):
    """6 volume-scan + 6 rattled frames and 2 isolated atoms, 25 % test: the unstratified sizes, both kinds in test."""
    strata = ['volume'] * 6 + ['rattle'] * 6 + ['IsolatedAtom'] * 2
    fractions = {'train': 0.75, 'test': 0.25}
    plain = split_indices(14, fractions, seed, always_train=[12, 13])
    split = split_indices(14, fractions, seed, always_train=[12, 13], strata=strata)
    assert {name: len(indices) for name, indices in split.items()} == {name: len(indices) for name, indices in plain.items()}
    assert sorted(i for part in split.values() for i in part) == list(range(14))
    assert {strata[i] for i in split['test']} == {'volume', 'rattle'}
    assert {12, 13} <= set(split['train'])
    assert split == split_indices(14, fractions, seed, always_train=[12, 13], strata=strata)
    with pytest.raises(ValueError, match='not both'):
        split_indices(14, fractions, seed, groups=strata, strata=strata)


def test_split_dataset_stratified_by_config_type():
    types = ['volume'] * 4 + ['rattle'] * 4 + ['IsolatedAtom']
    dataset = TrainingSet.from_ase(frames(9, types), fingerprint=FINGERPRINT).store()
    parts = split_dataset(dataset, orm.Dict({'train': 0.75, 'test': 0.25}), orm.Int(2),
                          stratify_by=orm.Str('config_type'))
    assert sorted(parts['test'].config_types) == ['rattle', 'volume']
    assert parts['train'].n_frames == 7


def test_group_split_keeps_groups_together_and_isolated_atoms_in_train():
    types = ['a'] * 4 + ['b'] * 4 + ['c'] * 4 + ['IsolatedAtom']
    dataset = TrainingSet.from_ase(frames(13, types), fingerprint=FINGERPRINT).store()
    parts = split_dataset(dataset, orm.Dict({'train': 0.34, 'valid': 0.33, 'test': 0.33}), orm.Int(1),
                          orm.Str('config_type'))
    seen = {}
    for name, part in parts.items():
        for config_type in part.config_types:
            seen.setdefault(config_type, set()).add(name)
    assert all(len(names) == 1 for names in seen.values())  # no group leaks across splits
    assert seen['IsolatedAtom'] == {'train'}
    assert sum(part.n_frames for part in parts.values()) == 13
    assert parts['train'].creator.process_label == 'split_dataset'


def test_new_frames_join_the_splits_furthest_below_their_share():
    fractions = {'train': 0.8, 'valid': 0.1, 'test': 0.1}
    # 36 split 28/4/4: four more frames all train (40 -> 32/4/4), isolated atoms always train
    assert extension_indices({'train': 28, 'valid': 4, 'test': 4}, ['rattle'] * 4, fractions, 1) == {
        'train': [0, 1, 2, 3], 'valid': [], 'test': []}
    twelve = extension_indices({'train': 28, 'valid': 4, 'test': 4}, ['rattle'] * 11 + ['IsolatedAtom'], fractions, 1)
    assert [len(twelve[name]) for name in ('train', 'valid', 'test')] == [10, 1, 1] and 11 in twelve['train']
    assert twelve == extension_indices({'train': 28, 'valid': 4, 'test': 4}, ['rattle'] * 11 + ['IsolatedAtom'],
                                       fractions, 1)


def test_extended_splits_keep_every_earlier_frame_where_it_was():
    dataset = TrainingSet.from_ase(frames(10), fingerprint=FINGERPRINT, sources=[f'old{i}' for i in range(10)]).store()
    fractions = orm.Dict({'train': 0.6, 'valid': 0.2, 'test': 0.2})
    splits = split_dataset(dataset, fractions, orm.Int(1))
    new = TrainingSet.from_ase(frames(5, seed=1), fingerprint=FINGERPRINT, sources=[f'new{i}' for i in range(5)]).store()
    extended = extend_splits(fractions, orm.Int(2), new, **splits)
    assert sorted(extended) == ['test', 'train', 'valid']
    for name in ('train', 'valid', 'test'):
        assert extended[name].source_uuids[:splits[name].n_frames] == splits[name].source_uuids
    assert [extended[name].n_frames for name in ('train', 'valid', 'test')] == [9, 3, 3]
    assert sorted(uuid for node in extended.values() for uuid in node.source_uuids if uuid.startswith('new')) == [
        f'new{i}' for i in range(5)]
    other = TrainingSet.from_ase(frames(1), fingerprint={**FINGERPRINT, 'ecutwfc': 50.0}).store()
    with pytest.raises(ValueError, match='other DFT settings'):
        extend_splits(orm.Dict({'train': 1.0}), orm.Int(1), other, train=splits['train'])


def test_too_small_dataset_gives_a_clear_error():
    dataset = TrainingSet.from_ase(frames(2), fingerprint=FINGERPRINT).store()
    with pytest.raises(ValueError, match='would be empty'):
        split_dataset(dataset, orm.Dict({'train': 0.8, 'valid': 0.1, 'test': 0.1}), orm.Int(1))


def test_merge_refuses_other_dft_settings_unless_forced():
    first = TrainingSet.from_ase(frames(2), fingerprint=FINGERPRINT).store()
    other_cutoff = TrainingSet.from_ase(frames(2), fingerprint={**FINGERPRINT, 'ecutwfc': 50.0}).store()
    with pytest.raises(ValueError, match=r'ecutwfc: 30\.0 != 50\.0'):
        merge_datasets(a=first, b=other_cutoff)
    merged = merge_datasets(a=first, b=other_cutoff, force=orm.Bool(True))
    assert merged.n_frames == 4 and 'mixed' in merged.fingerprint


def test_merge_of_other_elements_with_the_same_family_is_allowed():
    silicon = TrainingSet.from_ase(frames(2), fingerprint=FINGERPRINT).store()
    germanium = TrainingSet.from_ase(frames(2, symbol='Ge'),
                                     fingerprint={**FINGERPRINT, 'pseudos': {'Ge': 'def'}}).store()
    merged = merge_datasets(a=silicon, b=germanium)
    assert merged.elements == ['Ge', 'Si'] and merged.fingerprint['pseudos'] == {'Si': 'abc', 'Ge': 'def'}
    assert fingerprint_differences(FINGERPRINT, {**FINGERPRINT, 'pseudos': {'Si': 'zzz'}}) == [
        'pseudopotential of Si: abc != zzz']


def test_sampling_is_seeded_and_exact():
    si2 = orm.StructureData(ase=bulk('Si', 'diamond', a=5.43))
    first = rattle_structure(si2, orm.Float(0.05), orm.Int(3), orm.Int(7))
    again = rattle_structure(si2, orm.Float(0.05), orm.Int(3), orm.Int(7))
    assert sorted(first) == ['structure_000', 'structure_001', 'structure_002']
    for key in first:
        assert np.allclose(first[key].get_ase().positions, again[key].get_ase().positions)
    displacement = first['structure_000'].get_ase().positions - si2.get_ase().positions
    assert 0.005 < np.abs(displacement).mean() < 0.1

    volume = si2.get_ase().get_volume()
    scaled = scale_volume(si2, orm.List([-0.06, 0.0, 0.06]))
    assert [s.get_ase().get_volume() / volume for s in scaled.values()] == pytest.approx([0.94, 1.0, 1.06])

    sheared = strain_structure(si2, orm.List([[0, 0, 0, 0, 0, 0.02]]))['structure_000'].get_ase()
    assert sheared.get_volume() == pytest.approx(volume * (1 - 0.01 ** 2))

    assert len(make_supercell(si2, orm.List([2, 2, 2])).sites) == 16
    atom = isolated_atom(orm.Str('Si'), orm.Float(10.0)).get_ase()
    assert len(atom) == 1 and np.allclose(atom.cell.lengths(), 10.0)
    with pytest.raises(ValueError, match='too small'):
        isolated_atom(orm.Str('Si'), orm.Float(3.0))


def test_split_warnings_name_tiny_splits_and_splits_without_forces():
    from aiida_mlip.workflows.training import split_warnings

    good = TrainingSet.from_ase(frames(4, ['rattle'] * 4), fingerprint=FINGERPRINT)
    assert split_warnings('test', good.get_arrays()) == []
    tiny = TrainingSet.from_ase(frames(2, ['rattle'] * 2), fingerprint=FINGERPRINT)
    assert [w.split(':')[0] for w in split_warnings('valid', tiny.get_arrays())] == [
        'the valid split has 2 frame(s) (< 3)']
    still = frames(3, ['volume'] * 3)
    for atoms in still:
        atoms.arrays['REF_forces'][:] = 0.0
    warnings = split_warnings('test', TrainingSet.from_ase(still, fingerprint=FINGERPRINT).get_arrays())
    assert len(warnings) == 1 and 'no frame with non-zero forces' in warnings[0]
