"""DftLabelingWorkChain with the real pw.x: labels, units, quality control, provenance, bad input."""
import numpy as np
import pytest
from aiida import engine, orm

from aiida_mlip.calculations.sampling import rattle_structure
from aiida_mlip.data.dataset import TrainingSet
from aiida_mlip.workflows.labeling import DftLabelingWorkChain

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES, count_calcjobs

pytestmark = pytest.mark.pw

#: Forces pw.x to stop after one SCF step, with no restart: the frame must be dropped, not crash the run.
BROKEN = {'max_iterations': 1, 'pw': {'parameters': {'ELECTRONS': {'electron_maxstep': 1}}}}


def labeling_builder(code, structures, **overrides):
    return DftLabelingWorkChain.get_builder_from_protocol(
        code, structures, protocol='fast', pseudo_family=TEST_FAMILY,
        overrides={'pw_base': TEST_PW_OVERRIDES, **overrides},
    )


@pytest.fixture(scope='module')
def labeled(pw_code, pseudo_family):
    """Si2 (compressed), two rattled Si8, a Si2 forced to fail, and the isolated Si atom: one real run."""
    from ase.build import bulk

    si2 = orm.StructureData(ase=bulk('Si', 'diamond', a=5.43 * 0.97))
    si8 = orm.StructureData(ase=bulk('Si', 'diamond', a=5.43, cubic=True))
    rattled = rattle_structure(si8, orm.Float(0.05), orm.Int(2), orm.Int(7))
    structures = {'si2': si2, 'si2_broken': si2, 'si8_a': rattled['structure_000'], 'si8_b': rattled['structure_001']}
    builder = labeling_builder(
        pw_code, structures, isolated_atoms=True, structure_overrides={'si2_broken': BROKEN},
    )
    builder.config_types = orm.Dict({'si8_a': 'rattle', 'si8_b': 'rattle', 'si2': 'bulk'})
    results, node = engine.run_get_node(builder)
    return results, node


def test_labeling_finishes_and_drops_the_broken_frame(labeled):
    results, node = labeled
    assert node.is_finished_ok, node.exit_message
    report = results['quality_report'].get_dict()
    assert report['n_frames'] == 5
    assert list(report['dropped']) == ['si2_broken']
    assert 'exit status' in report['dropped']['si2_broken']
    assert report['failure_fraction'] == pytest.approx(0.2)
    dataset = results['dataset']
    assert isinstance(dataset, TrainingSet)
    assert dataset.n_frames == 4
    assert dataset.elements == ['Si']
    assert dataset.config_types == {'IsolatedAtom': 1, 'bulk': 1, 'rattle': 2}


def test_labels_have_physical_values_and_units(labeled):
    frames = {frame.info['config_type'] + str(len(frame)): frame for frame in labeled[0]['dataset'].to_ase()}
    si2, isolated = frames['bulk2'], frames['IsolatedAtom1']
    rattled = [frame for frame in labeled[0]['dataset'].to_ase() if frame.info['config_type'] == 'rattle']
    per_atom = [f.info['REF_energy'] / len(f) for f in [si2] + rattled]
    # Same DFT for all frames: per-atom energies of bulk Si agree to within a few tens of meV.
    assert max(per_atom) - min(per_atom) < 0.1
    # Cohesion: a bulk atom is lower in energy than the isolated atom by eV, not meV or keV.
    assert 2.0 < isolated.info['REF_energy'] - min(per_atom) < 8.0
    for frame in rattled:
        forces = frame.arrays['REF_forces']
        assert forces.shape == (8, 3)
        assert np.abs(forces).max() > 0.01  # rattled: real forces
        assert np.linalg.norm(forces.sum(axis=0)) < 0.01  # Newton's third law within numerical noise
    # Compressed Si2: ASE sign convention (compressive = negative) and eV/Å³ (12.8 GPa is ~0.08 eV/Å³).
    stress = si2.info['REF_stress']
    assert stress.shape == (3, 3)
    assert -0.3 < stress[0, 0] < -0.01
    assert np.allclose(np.diag(stress), stress[0, 0], rtol=1e-3)
    assert np.abs(si2.arrays['REF_forces']).max() < 1e-3  # perfect crystal


def test_every_frame_points_to_its_pw_calculation(labeled):
    dataset = labeled[0]['dataset']
    energies = [frame.info['REF_energy'] for frame in dataset.to_ase()]
    for uuid, energy in zip(dataset.source_uuids, energies):
        calculation = orm.load_node(uuid)
        assert calculation.process_type == 'aiida.calculations:quantumespresso.pw'
        assert calculation.outputs.output_parameters['energy'] == pytest.approx(energy)
    # The dataset's creator is a calcfunction whose inputs are the PwCalculation outputs.
    creator = dataset.creator
    assert creator.process_label == 'collect_labeled_frames'
    parents = {link.node.creator.uuid for link in creator.base.links.get_incoming().all()
               if link.link_label.endswith('_parameters')}
    assert parents == set(dataset.source_uuids)
    fingerprint = dataset.fingerprint
    assert fingerprint['ecutwfc'] == 20.0 and fingerprint['pseudo_family'] == TEST_FAMILY
    assert fingerprint['functional'] == 'PBE' and set(fingerprint['pseudos']) == {'Si'}


def test_smeared_runs_get_enough_bands_up_front(labeled):
    """The `fast` protocol smears: each cell gets bands_for_smearing(N) bands and passes aiida-quantumespresso's
    band-occupation check the first time. With pw.x's default (20 for Si8) the rattled Si8 cells ran twice."""
    from aiida_mlip.workflows.labeling import bands_for_smearing

    _, node = labeled
    checked = 0
    for workchain in node.called:
        if workchain.process_label != 'PwBaseWorkChain' or not workchain.is_finished_ok:
            continue
        calculations = [called for called in workchain.called if isinstance(called, orm.CalcJobNode)]
        assert len(calculations) == 1, f'{workchain.pk} restarted: {workchain.base.attributes.all}'
        system = calculations[0].inputs.parameters['SYSTEM']
        assert system['occupations'] == 'smearing'
        electrons = 4 * len(calculations[0].inputs.structure.sites)
        assert system['nbnd'] == bands_for_smearing(electrons)
        checked += 1
    assert checked == 4
    assert bands_for_smearing(8) == 12 and bands_for_smearing(32) == 24 and bands_for_smearing(44) == 30  # Si2, Si8, Cu4
    assert bands_for_smearing(200) == 130


def pw_base_without_remote_folder(real_pw_base, workchain_exit=11, calculation_exit=0, remote_folder=False):
    """The state aiida-core 2.9 leaves after a worker is killed around an upload (labeled_outputs' docstring): a
    PwBaseWorkChain failed with ``workchain_exit`` that called a PwCalculation finished with ``calculation_exit``
    holding copies of a real run's labels, with or without ``remote_folder``."""
    from aiida.common.links import LinkType
    from aiida.engine import ProcessState

    real = [called for called in real_pw_base.called if isinstance(called, orm.CalcJobNode)][-1]
    workchain = orm.WorkChainNode(process_type=real_pw_base.process_type)
    workchain.set_process_state(ProcessState.FINISHED)
    workchain.set_exit_status(workchain_exit)
    workchain.store()
    calculation = orm.CalcJobNode(computer=real.computer, process_type=real.process_type)
    calculation.base.links.add_incoming(workchain, LinkType.CALL_CALC, 'iteration_01')
    calculation.set_process_state(ProcessState.FINISHED)
    calculation.set_exit_status(calculation_exit)
    calculation.store()
    labels = ['output_parameters', 'output_trajectory'] + (['remote_folder'] if remote_folder else [])
    for label in labels:
        output = real.outputs[label].clone()
        output.base.links.add_incoming(calculation, LinkType.CREATE, label)
        output.store()
    return workchain, calculation


def test_labels_of_a_calculation_that_lost_its_remote_folder_are_kept(labeled):
    from aiida_mlip.workflows.labeling import labeled_outputs

    _, node = labeled
    pw_bases = {link.link_label.removeprefix('label_'): link.node for link in node.base.links.get_outgoing().all()
                if link.link_label.startswith('label_')}
    outputs, warnings = labeled_outputs(pw_bases['si2'])
    assert outputs.output_parameters.uuid == pw_bases['si2'].outputs.output_parameters.uuid and warnings == []
    assert labeled_outputs(pw_bases['si2_broken']) == (None, [])  # a real failure stays a failure

    for calculation_exit in (0, 11):
        workchain, calculation = pw_base_without_remote_folder(pw_bases['si2'], calculation_exit=calculation_exit)
        outputs, warnings = labeled_outputs(workchain)
        assert outputs.output_parameters.uuid == calculation.outputs.output_parameters.uuid
        assert outputs.output_parameters['energy'] == pw_bases['si2'].outputs.output_parameters['energy']
        assert f'PwCalculation<{calculation.pk}>' in warnings[0] and 'remote_folder' in warnings[0]
    # Only that gap is salvaged: another exit status of either, or a remote_folder present, is a failure.
    for case in ({'workchain_exit': 300}, {'calculation_exit': 305}, {'remote_folder': True}):
        workchain, _ = pw_base_without_remote_folder(pw_bases['si2'], **case)
        assert labeled_outputs(workchain) == (None, []), case


def test_extxyz_export_is_read_by_mace(labeled, tmp_path):
    from mace.data.utils import KeySpecification, load_from_xyz

    path = tmp_path / 'train.xyz'
    assert labeled[0]['dataset'].write_extxyz(path) == 4
    keys = KeySpecification.from_defaults().update(
        info_keys={'energy': 'REF_energy', 'stress': 'REF_stress'}, arrays_keys={'forces': 'REF_forces'})
    atomic_energies, configs = load_from_xyz(str(path), keys, extract_atomic_energies=True)
    isolated = [f for f in labeled[0]['dataset'].to_ase() if f.info['config_type'] == 'IsolatedAtom'][0]
    assert atomic_energies == {14: pytest.approx(isolated.info['REF_energy'])}
    assert len(configs) == 3
    bulk = [c for c in configs if c.config_type == 'bulk'][0]
    assert bulk.properties['stress'].shape == (3, 3) or bulk.properties['stress'].shape == (6,)
    assert np.all(np.asarray(bulk.properties['stress']) < 0.5)


def test_too_many_failures_fail_with_exit_code_and_keep_the_data(pw_code, pseudo_family, si2):
    builder = labeling_builder(pw_code, {'good': si2, 'bad': si2}, structure_overrides={'bad': BROKEN})
    results, node = engine.run_get_node(builder)
    assert node.exit_status == DftLabelingWorkChain.exit_codes.ERROR_TOO_MANY_REJECTED_FRAMES.status
    assert '50%' in node.exit_message
    assert results['dataset'].n_frames == 1  # what was computed is not lost
    assert list(results['quality_report']['dropped']) == ['bad']


def test_max_concurrent_caps_the_runs_in_flight_and_starts_the_largest_first(pw_code, pseudo_family):
    from ase.build import bulk

    si8 = rattle_structure(orm.StructureData(ase=bulk('Si', 'diamond', a=5.43, cubic=True)), orm.Float(0.05),
                           orm.Int(1), orm.Int(3))['structure_000']
    structures = {'a_si2': orm.StructureData(ase=bulk('Si', 'diamond', a=5.36)),
                  'b_si2': orm.StructureData(ase=bulk('Si', 'diamond', a=5.50)), 'z_si8': si8}
    results, node = engine.run_get_node(labeling_builder(pw_code, structures, max_concurrent=2))
    assert node.is_finished_ok, node.exit_message
    assert results['dataset'].n_frames == 3
    runs = sorted((called for called in node.called if called.process_label == 'PwBaseWorkChain'),
                  key=lambda called: called.ctime)
    assert len(runs) == 3 and all(run.is_finished_ok for run in runs)
    # the 8-atom frame starts first although its key sorts last: no long run is left to end alone
    assert len(runs[0].inputs.pw.structure.sites) == 8
    # never more than 2 in flight (a node is sealed at termination): the third starts after one of the first two ended
    assert runs[2].ctime > min(run.mtime for run in runs[:2])
    assert runs[1].ctime < runs[0].mtime  # the first two ran side by side


def test_max_concurrent_below_one_is_refused(pw_code, pseudo_family, si2):
    before = count_calcjobs()
    with pytest.raises(ValueError, match='max_concurrent must be a positive number'):
        engine.run(labeling_builder(pw_code, [si2], max_concurrent=0))
    assert count_calcjobs() == before


# ---- bad input: refused before any pw.x runs --------------------------------------------------------------

def test_element_missing_from_family_is_named(pw_code, pseudo_family):
    from ase.build import bulk

    gold = orm.StructureData(ase=bulk('Au', 'fcc', a=4.08))
    before = count_calcjobs()
    with pytest.raises(ValueError, match=r'no pseudopotential for Au'):
        labeling_builder(pw_code, [gold])
    builder = labeling_builder(pw_code, [orm.StructureData(ase=bulk('Si', 'diamond', a=5.43))])
    builder.structures = {'gold': gold}
    with pytest.raises(ValueError, match=r'no pseudopotential for Au'):
        engine.run(builder)
    assert count_calcjobs() == before


def test_empty_structure_list_is_refused(pw_code, pseudo_family, si2):
    with pytest.raises(ValueError, match='empty'):
        labeling_builder(pw_code, [])
    builder = labeling_builder(pw_code, [si2])
    with pytest.raises(ValueError, match='empty'):  # the namespace validator refuses it on assignment
        builder.structures = {}


def test_overlapping_atoms_are_refused(pw_code, pseudo_family):
    from ase import Atoms

    atoms = Atoms('Si2', positions=[[0, 0, 0], [0.3, 0, 0]], cell=[5, 5, 5], pbc=True)
    before = count_calcjobs()
    with pytest.raises(ValueError, match=r'0\.300 Å apart'):
        labeling_builder(pw_code, {'clash': orm.StructureData(ase=atoms)})
    assert count_calcjobs() == before


def test_unknown_protocol_is_refused(pw_code, pseudo_family, si2):
    with pytest.raises(ValueError, match='not a valid protocol'):
        DftLabelingWorkChain.get_builder_from_protocol(pw_code, [si2], protocol='ultrafast', pseudo_family=TEST_FAMILY)


def test_code_that_is_not_pw_is_refused(pw_code, pseudo_family, si2, localhost):
    other = orm.InstalledCode(label='not-pw', computer=localhost, filepath_executable='/bin/true',
                              default_calc_job_plugin='core.arithmetic.add').store()
    with pytest.raises(ValueError, match='needs a `quantumespresso.pw` code'):
        labeling_builder(other, [si2])
    builder = labeling_builder(pw_code, [si2])
    builder.pw_base.pw.code = other
    with pytest.raises(ValueError, match='needs a `quantumespresso.pw` code'):
        engine.run(builder)


def test_overrides_may_not_change_cutoffs_per_frame(pw_code, pseudo_family, si2):
    builder = labeling_builder(pw_code, {'a': si2})
    builder.structure_overrides = orm.Dict({'a': {'pw': {'parameters': {'SYSTEM': {'ecutwfc': 60}}}}})
    with pytest.raises(ValueError, match=r'pw\.parameters\.SYSTEM'):
        engine.run(builder)
