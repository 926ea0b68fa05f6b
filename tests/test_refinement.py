"""RefinementWorkChain with the real pw.x and real MACE on Si2: a failed EOS check becomes new EOS cells off the
validation grid, the DFT reference is computed once and reused, the label budget stops the loop, and a passing
validation stops it at once (thresholds set so that the verdict is known before the run: accuracy itself is
measured by the main job and benchmarks/refinement.py, not here)."""
import pytest
from aiida import engine, orm
from aiida.common.links import LinkType

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES
from .fixtures_mlip import diamond, label_si, mlip_codes  # noqa: F401  (fixture)
from .fixtures_mlip import pw_ancestors

PW = 'aiida.calculations:quantumespresso.pw'
IMPOSSIBLE = {'v0_error_percent': 1e-9, 'b0_error_percent': 1e-9}
TRIVIAL = {'v0_error_percent': 1e9, 'b0_error_percent': 1e9}


def refinement_builder(dataset, structure, pw_code, codes, thresholds, **overrides):
    from aiida_mlip.workflows.refinement import RefinementWorkChain

    return RefinementWorkChain.get_builder_from_protocol(
        dataset, structure, codes['mace_train'], codes['evaluate'], pw_code, protocol='fast',
        pseudo_family=TEST_FAMILY, overrides={
            'labeling': {'pw_base': TEST_PW_OVERRIDES},
            'training': {'split_fractions': {'train': 0.7, 'valid': 0.15, 'test': 0.15},
                         'mace': {'max_num_epochs': 8}},
            'validation': {'properties': ['eos'], 'thresholds': thresholds},
            **overrides,
        })


def pw_calculations_below(node) -> int:
    return sum(1 for descendant in node.called_descendants if descendant.process_type == PW)


@pytest.fixture(scope='module')
def seed_dataset(pw_code, pseudo_family):
    return label_si(pw_code)


@pytest.fixture(scope='module')
def refined(seed_dataset, pw_code, mlip_codes):  # noqa: F811
    """Two refinement iterations against impossible EOS thresholds: 2 cells per check, a budget of 3 labels."""
    builder = refinement_builder(seed_dataset, diamond(), pw_code, mlip_codes, IMPOSSIBLE,
                                 max_iterations=3, max_new_labels=3, targets={'cells_per_check': {'eos': 2}},
                                 retrain={'start': 'previous'})  # the protocol's default is `scratch`
    return engine.run_get_node(builder)


def test_failed_eos_gives_new_eos_cells_until_the_label_budget_is_spent(refined, seed_dataset):
    results, node = refined
    assert node.is_finished_ok, node.exit_message
    summary = results['summary'].get_dict()
    assert summary['passed'] is False
    assert summary['stop_reason'] == 'max_new_labels (3) spent'
    assert summary['n_iterations'] == 2  # 2 labels, then the 1 left of the budget
    assert summary['dft_labels'] == [seed_dataset.n_frames, seed_dataset.n_frames + 2, seed_dataset.n_frames + 3]
    assert results['dataset'].n_frames == seed_dataset.n_frames + 3
    assert set(results['iterations']) == {'iteration_0', 'iteration_1', 'iteration_2'}
    for record in results['iterations'].values():
        validation = record['validation']['structure']
        assert validation['passed'] is False and 'eos.v0_error_percent' in validation['checks']
        assert 'v0_error_percent' in validation['errors']['eos']


def test_targeted_cells_are_off_the_validation_volumes(refined):
    results, node = refined
    reference = results['reference']
    volumes = reference['structure__eos_curve'].get_array('volumes')
    labelings = [c for c in node.called if c.process_label == 'DftLabelingWorkChain']
    assert len(labelings) == 2
    new_volumes = [s.get_cell_volume() / len(s.sites)  # per atom, as the EOS curve's
                   for labeling in labelings for s in labeling.inputs.structures.values()]
    assert len(new_volumes) == 3
    assert min(abs(v - w) / w for v in new_volumes for w in volumes) > 0.005
    # near the scan (the protocol's +-6 % grid): half a step beyond its ends or between its points, not elsewhere
    step = min(abs(b - a) for a, b in zip(volumes, volumes[1:]))
    assert all(min(volumes) - 1.6 * step < v < max(volumes) + 1.6 * step for v in new_volumes), (new_volumes, volumes)
    assert all(ct.startswith('refine_eos') for labeling in labelings
               for ct in labeling.inputs.config_types.get_dict().values())


def test_dft_reference_is_computed_once_and_reused(refined):
    """One reference workflow without a model, launched with the first training (not after it); no validation
    runs pw.x, every comparison is against the very nodes of that one DFT run."""
    results, node = refined
    calls = {link.link_label: link.node for link in node.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all()}
    reference, training = calls['reference_structure'], calls['training_0']
    assert 'mlip' not in reference.inputs and 'comparison' not in reference.outputs
    assert pw_calculations_below(reference) >= 5  # the EOS scan (and the relaxation, when it relaxes)
    assert reference.ctime < training.ctime + (training.mtime - training.ctime) / 2  # not after the training
    validations = sorted((c for label, c in calls.items() if label.startswith('validation_')), key=lambda n: n.pk)
    assert len(validations) == 3
    assert [pw_calculations_below(v) for v in validations] == [0, 0, 0]
    assert all(v.inputs.reference.eos.uuid == reference.outputs.dft.eos.uuid for v in validations)
    assert results['reference']['structure__eos'].uuid == reference.outputs.dft.eos.uuid
    # the final dataset's labels all come from pw.x runs: 3 targeted ones beyond the seed's
    assert len(pw_ancestors(results['dataset'])) == len(pw_ancestors(validations[0].inputs.mlip.models['member_0'])) + 3


def test_later_iterations_go_on_from_the_previous_models_on_kept_splits(refined):
    """retrain `previous`: member i starts from member i of the iteration before, for 0.34 of the epochs, and every
    split keeps its frames, so no model is scored on a frame it or its start has trained on."""
    _, node = refined
    trainings = sorted((c for c in node.called if c.process_label == 'TrainingWorkChain'), key=lambda n: n.pk)
    assert len(trainings) == 3
    incoming = {link.link_label for link in trainings[0].base.links.get_incoming().all()}
    assert not any(label.startswith(('initial_models', 'splits')) for label in incoming)
    for before, after in zip(trainings, trainings[1:]):
        assert after.inputs.initial_models.member_0.uuid == before.outputs.models.member_0.uuid
        for name, split in before.outputs.split.items():
            assert after.outputs.split[name].source_uuids[:split.n_frames] == split.source_uuids
        member = next(c for c in after.called if c.process_label == 'MaceTrainBaseWorkChain')
        assert member.inputs.mace.parameters['max_num_epochs'] == 3  # round(0.34 x 8)
        assert member.inputs.mace.foundation_model.uuid == before.outputs.models.member_0.uuid


def test_a_passing_validation_stops_the_loop_at_once(refined, seed_dataset, pw_code, mlip_codes):  # noqa: F811
    """With the `reference` output of the first run given as input, the whole refinement runs no pw.x at all."""
    first, _ = refined
    builder = refinement_builder(seed_dataset, diamond(), pw_code, mlip_codes, TRIVIAL, max_iterations=3)
    builder.reference = dict(first['reference'])
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    summary = results['summary'].get_dict()
    assert summary['passed'] is True and summary['stop_reason'] == 'passed in iteration 0'
    assert summary['n_iterations'] == 0 and summary['new_labels'] == 0
    assert pw_calculations_below(node) == 0
    assert results['dataset'].uuid == seed_dataset.uuid


def test_bad_inputs_are_refused_before_anything_runs(seed_dataset, pw_code, mlip_codes):  # noqa: F811
    builder = refinement_builder(seed_dataset, diamond('Ge', 5.65), pw_code, mlip_codes, TRIVIAL)
    with pytest.raises(ValueError, match='absent from the dataset'):
        engine.run(builder)
    with pytest.raises(ValueError, match='cells_per_check'):  # refused by the port when the builder is made
        refinement_builder(seed_dataset, diamond(), pw_code, mlip_codes, TRIVIAL,
                           targets={'cells_per_check': {'eos': -1}})
    builder = refinement_builder(seed_dataset, diamond(), pw_code, mlip_codes, TRIVIAL, max_new_labels=0)
    with pytest.raises(ValueError, match='max_new_labels'):
        engine.run(builder)
    builder = refinement_builder(seed_dataset, diamond(), pw_code, mlip_codes, TRIVIAL)
    builder.reference = {'silicon__eos': orm.Dict({'v0': 20.0})}
    with pytest.raises(ValueError, match=r"reference: `silicon` is not one of the structures \['structure'\]"):
        engine.run(builder)
    with pytest.raises(ValueError, match='retrain.start must be one of'):
        refinement_builder(seed_dataset, diamond(), pw_code, mlip_codes, TRIVIAL, retrain={'start': 'warm'})


def test_report_plots_each_validation_error_against_the_dft_labels(refined, tmp_path):
    from aiida_mlip.report.html import write_report

    _, node = refined
    index = write_report(node, tmp_path)
    html = index.read_text(encoding='utf-8')
    assert '<section id="refinement"><h2>Refinement</h2>' in html
    assert 'validation errors against DFT labels' in html and 'max_new_labels (3) spent' in html
    figures = sorted(path.name for path in tmp_path.glob('*refinement*.png'))
    assert len(figures) == 1 and (tmp_path / figures[0]).stat().st_size > 1000
