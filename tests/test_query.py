"""Provenance queries (aiida_mlip.query, `aiida-mlip query`) on real graphs: the tiny Si model trained on pw.x labels
(`trained`) and one real fine-tuning iteration of it with its validations (`finetuned`), both shared fixtures."""
import json

import pytest
from aiida import orm
from aiida.common.links import LinkType
from click.testing import CliRunner

from aiida_mlip.cli import cli
from aiida_mlip.data.model import MlipModel
from aiida_mlip.query import lineage, models_covering, validation_results

from .conftest import TEST_FAMILY
from .fixtures_mlip import (  # noqa: F401  (fixtures)
    finetuned, mlip_codes, pw_ancestors, si_dataset, si_splits, trained, untrained_si_ge,
)

pytestmark = [pytest.mark.pw, pytest.mark.mace]


def input_sources(result) -> set:
    return {uuid for record in result.datasets if record.depth == 0
            for uuid in orm.load_node(record.pk).source_uuids if uuid}


def check_pw_records(result, pseudo_family):
    """Every PwCalculation record: the test cutoffs, the test family and its UPF md5 for every kind."""
    for record in result.pw_calculations:
        assert (record.ecutwfc, record.ecutrho) == (20.0, 160.0), record
        assert TEST_FAMILY in record.pseudo_families, record
        assert record.pseudo_md5s == {'Si': pseudo_family.get_pseudo('Si').md5}, record
        assert record.exit_status == 0 and record.n_frames >= 1
        assert record.formula in ('Si', 'Si2') and record.kpoints_mesh and len(record.kpoints_mesh) == 3


def test_lineage_of_a_model_trained_on_pw_labels(trained, si_dataset, si_splits, pseudo_family):  # noqa: F811
    model = trained[0]['model']
    result = lineage(model)
    assert result.model.uuid == model.uuid and result.foundations == []
    assert [p.pk for p in result.training_calculations] == [trained[1].pk] and result.workflows == []

    by_uuid = {record.uuid: record for record in result.datasets}
    for role in ('train', 'valid', 'test'):
        record = by_uuid[si_splits[role].uuid]
        assert record.roles == [role] and record.depth == 0 and record.creator.startswith('split_dataset<')
        assert record.parents == [si_dataset.uuid]
    source = by_uuid[si_dataset.uuid]
    assert source.depth == 1 and source.roles == [] and source.creator.startswith('collect_labeled_frames<')
    assert (source.pseudo_family, source.ecutwfc, source.ecutrho) == (TEST_FAMILY, 20.0, 160.0)
    assert len(result.datasets) == 4

    listed = {record.uuid for record in result.pw_calculations}
    assert len(result.pw_calculations) == len(input_sources(result)) == si_dataset.n_frames == 13
    assert listed == input_sources(result) == pw_ancestors(model)
    assert sum(record.n_frames for record in result.pw_calculations) == 13
    assert result.other_sources == [] and result.n_frames_without_source == 0
    check_pw_records(result, pseudo_family)
    isolated = [record for record in result.pw_calculations if record.formula == 'Si']
    assert len(isolated) == 1 and isolated[0].kpoints_mesh == [1, 1, 1] and isolated[0].roles == ['train']
    json.dumps(result.to_dict())  # plain data all the way down


def test_lineage_of_a_finetuned_model_follows_the_foundation_chain(finetuned, pseudo_family):  # noqa: F811
    foundation, results, node = finetuned
    model = results['model']
    result = lineage(model)
    assert [record.uuid for record in result.foundations] == [foundation.uuid]
    assert [p.process_label for p in result.workflows] == [
        'MaceTrainBaseWorkChain', 'TrainingWorkChain', 'FineTuningWorkChain']
    assert result.workflows[-1].pk == node.pk

    labels = results['dataset']  # the labels of the one iteration, split by the TrainingWorkChain
    by_uuid = {record.uuid: record for record in result.datasets}
    assert by_uuid[labels.uuid].creator.startswith('collect_labeled_frames<') and by_uuid[labels.uuid].depth == 1
    assert sorted(role for record in result.datasets for role in record.roles) == ['test', 'train', 'valid']

    listed = {record.uuid for record in result.pw_calculations}
    assert len(listed) == len(input_sources(result)) == len(set(labels.source_uuids)) == 6
    assert listed == set(labels.source_uuids)
    check_pw_records(result, pseudo_family)
    # The foundation's own labels belong to the foundation's lineage, not to the fine-tuning frames.
    assert not listed & {record.uuid for record in lineage(foundation).pw_calculations}
    assert listed < pw_ancestors(model)  # the graph also reaches them through the foundation


def test_models_covering_uses_the_elements_attribute(trained, finetuned, untrained_si_ge):  # noqa: F811
    si_ge = MlipModel.from_file(untrained_si_ge, label='query-si-ge').store()
    trained_model, tuned = trained[0]['model'], finetuned[1]['model']

    found = {record.uuid for record in models_covering('Si')}
    assert {trained_model.uuid, tuned.uuid, si_ge.uuid} <= found
    assert models_covering(['Si', 'Xx']) == []
    both = {record.uuid for record in models_covering('Si,Ge')}
    assert si_ge.uuid in both and trained_model.uuid not in both
    exact = {record.uuid for record in models_covering(['Si'], exact=True)}
    assert trained_model.uuid in exact and si_ge.uuid not in exact
    assert {record.uuid for record in models_covering(['Ge', 'Si'], exact=True)} >= {si_ge.uuid}
    with pytest.raises(ValueError, match='at least one element'):
        models_covering([])
    imported = lineage(si_ge)  # an imported file: no training in this database
    assert imported.model.origin == 'imported' and imported.training_calculations == imported.datasets == []


def test_validation_results_of_the_finetuned_and_the_foundation_model(finetuned):  # noqa: F811
    foundation, results, node = finetuned
    validations = {n.base.links.get_incoming(link_type=LinkType.CALL_WORK).one().link_label: n for n in node.called
                   if n.process_label == 'ValidationWorkChain'}

    records = {r.process.pk: r for r in validation_results(results['model'])}
    record = records[validations['validate_iteration_01'].pk]
    assert validations['validate_scratch'].pk not in records  # another model
    expected = validations['validate_iteration_01'].outputs.comparison.get_dict()
    assert record.passed is expected['verdict']['passed'] and record.failed == expected['verdict']['failed']
    assert record.comparison == expected and 'eos' in record.properties
    assert record.port == 'member_0' and record.structure_formula == 'Si2'
    assert record.caller == f'FineTuningWorkChain<{node.pk}> (validate_iteration_01)'
    assert validations['validate_zero_shot'].pk in [r.process.pk for r in validation_results(foundation)]
    assert validation_results(results['scratch_model'])[0].process.pk == validations['validate_scratch'].pk


def test_cli(aiida_profile, finetuned, untrained_si_ge):  # noqa: F811
    foundation, results, node = finetuned
    model = results['model']
    runner = CliRunner()
    base = ['-p', aiida_profile.name, 'query']

    shown = runner.invoke(cli, [*base, 'lineage', str(model.pk)])
    assert shown.exit_code == 0, shown.output
    assert f'Foundation chain: {model.pk} -> {foundation.pk}' in shown.output
    assert 'PwCalculations (6, labeling 6 frames' in shown.output and TEST_FAMILY in shown.output
    as_json = json.loads(runner.invoke(cli, [*base, 'lineage', model.uuid, '--json']).output)
    assert len(as_json['pw_calculations']) == 6 and as_json['foundations'][0]['uuid'] == foundation.uuid

    listing = runner.invoke(cli, [*base, 'models', '--elements', 'Si', '--exact'])
    assert listing.exit_code == 0 and str(model.pk) in [line.split()[0] for line in listing.output.splitlines()]
    as_json = json.loads(runner.invoke(cli, [*base, 'models', '-e', 'Si', '--json']).output)
    assert model.uuid in {record['uuid'] for record in as_json}

    validation = runner.invoke(cli, [*base, 'validation', model.uuid])
    assert validation.exit_code == 0 and 'validate_iteration_01' in validation.output
    as_json = json.loads(runner.invoke(cli, [*base, 'validation', str(model.pk), '--json']).output)
    assert 'member_0' in [record['port'] for record in as_json]

    for arguments in (['lineage', str(node.pk)], ['lineage', 'no-such-model'], ['validation', str(node.pk)],
                      ['models', '-e', 'Si,Xx']):
        refused = runner.invoke(cli, [*base, *arguments])
        assert refused.exit_code == 2, (arguments, refused.output)
