"""The `refinement` section of a campaign file: checked like every other section, resolved against the refinement
protocol, and turned into the CampaignWorkChain's `refinement` input (no profile needed for the schema)."""
import pytest

from aiida_mlip.campaigns.builder import refinement_inputs
from aiida_mlip.campaigns.schema import CampaignError, check_campaign

SI = {
    'name': 'si_refine',
    'classes': {'covalent': {'materials': [{'formula': 'Si', 'prototype': 'diamond', 'a': 5.43}]}},
    'sampling': {'volumes': [-0.02, 0.02]},
    'validation': {'properties': ['eos', 'elastic']},
}


def campaign_with(**sections) -> dict:
    return {**SI, **sections}


def errors_of(data) -> list[str]:
    with pytest.raises(CampaignError) as info:
        check_campaign(data, 'camp.yaml')
    return info.value.errors


def test_refinement_section_is_normalised_and_resolved_against_the_protocol():
    campaign = check_campaign(campaign_with(refinement={'max_new_labels': 10, 'cells_per_check': {'eos': 3}}))
    assert campaign['refinement'] == {'protocol': 'fast', 'max_new_labels': 10, 'cells_per_check': {'eos': 3}}
    inputs = refinement_inputs(campaign['refinement'])
    assert inputs['max_new_labels'] == 10
    assert inputs['max_iterations'] == 2  # the `fast` protocol's
    assert inputs['targets']['cells_per_check'] == {'eos': 3, 'elastic': 6, 'phonons': 4, 'md_stability': 4}
    assert check_campaign(SI)['refinement'] is None
    assert inputs['retrain'] == {'start': 'scratch', 'epoch_fraction': 0.34, 'mace': {}}
    previous = check_campaign(campaign_with(refinement={'retrain': 'previous'}))['refinement']
    assert refinement_inputs(previous)['retrain']['start'] == 'previous'
    assert 'camp.yaml:refinement.retrain: `warm` is not one of previous, scratch' in errors_of(
        campaign_with(refinement={'retrain': 'warm'}))[0]


@pytest.mark.parametrize('section, expected', [
    ({'max_new_labels': 0}, 'camp.yaml:refinement.max_new_labels: must be >= 1, got 0'),
    ({'max_iterations': 'two'}, "camp.yaml:refinement.max_iterations: must be an integer, got a string 'two'"),
    ({'cells_per_check': {'eos': -2}}, 'camp.yaml:refinement.cells_per_check.eos: must be >= 0, got -2'),
    ({'cells_per_check': {'bands': 2}}, 'camp.yaml:refinement.cells_per_check.bands: unknown key'),
    ({'protocol': 'quick'}, 'camp.yaml:refinement.protocol: `quick` is not one of'),
    ({'max_iteration': 2}, 'camp.yaml:refinement.max_iteration: unknown key; did you mean `max_iterations`?'),
])
def test_bad_refinement_settings_name_the_key(section, expected):
    assert any(error.startswith(expected) for error in errors_of(campaign_with(refinement=section))), expected


def test_refinement_needs_a_validation_and_no_transferability():
    data = campaign_with(refinement={})
    del data['validation']
    assert 'camp.yaml:refinement: needs a `validation` section' in errors_of(data)[0]
    data = campaign_with(refinement={}, transferability={'enabled': True})
    data['classes'] = {**data['classes'], 'more': {'materials': [{'formula': 'Ge', 'prototype': 'diamond', 'a': 5.66}]}}
    assert any('cannot be combined with `transferability`' in error for error in errors_of(data))
