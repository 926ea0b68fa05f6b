"""A normalised campaign (aiida_mlip.campaigns.schema) -> a ``CampaignWorkChain`` builder.

The sub-workflows' inputs come from their own ``get_builder_from_protocol`` with the campaign's protocols and
overrides, so a campaign runs exactly what the same builder calls would run by hand. The DFT cutoffs are fixed
here, once for all elements of the campaign (the family's largest recommendation, or the file's ``dft``
overrides), so that every class is labeled with the same settings and the datasets merge.
"""
from __future__ import annotations

from aiida import orm

from aiida_mlip.campaigns.schema import CampaignError, load_foundation_model, material_atoms, profile_problems


def _pruned(builder, *drop) -> dict:
    inputs = builder._inputs(prune=True)  # noqa: SLF001  (a nested builder reused as a namespace, as in finetune)
    for key in drop:
        inputs.pop(key, None)
    return inputs


def campaign_cutoffs(campaign: dict) -> tuple[float, float]:
    """(ecutwfc, ecutrho) in Ry for every class: the file's, else the family's recommendation for all elements."""
    from aiida_mlip.workflows.labeling import load_pseudo_family

    dft = campaign['dft']
    if dft.get('ecutwfc'):
        return float(dft['ecutwfc']), float(dft['ecutrho'])
    family = load_pseudo_family(campaign['pseudo_family'])
    return family.get_recommended_cutoffs(elements=tuple(campaign['elements']), unit='Ry')


def refinement_inputs(settings: dict) -> dict:
    """RefinementWorkChain's budgets and targets: its protocol, with the campaign file's values on top."""
    from aiida_mlip.workflows.refinement import RefinementWorkChain

    overrides = {key: settings[key] for key in ('max_iterations', 'max_new_labels', 'seed') if key in settings}
    if 'cells_per_check' in settings:
        overrides['targets'] = {'cells_per_check': settings['cells_per_check']}
    if 'retrain' in settings:
        overrides['retrain'] = {'start': settings['retrain']}
    inputs = RefinementWorkChain.get_protocol_inputs(settings['protocol'], overrides)
    return {key: inputs[key] for key in ('max_iterations', 'max_new_labels', 'seed', 'targets', 'retrain')}


def build_campaign(campaign: dict, filename: str = '<campaign>'):
    """The builder of ``CampaignWorkChain`` for a normalised campaign; needs a loaded profile.

    Raises :class:`CampaignError` (``FILE:KEY: problem`` lines) for what the profile cannot provide; nothing is
    stored by this function except what the sub-builders look up.
    """
    from aiida_mlip.data.dataset import TrainingSet
    from aiida_mlip.workflows.campaign import CampaignWorkChain
    from aiida_mlip.workflows.finetune import FIXED_BY_FOUNDATION
    from aiida_mlip.workflows.labeling import DftLabelingWorkChain
    from aiida_mlip.workflows.training import TrainingWorkChain
    from aiida_mlip.workflows.validation import ValidationWorkChain

    problems = profile_problems(campaign, filename)
    if problems:
        raise CampaignError(problems)
    codes = {key: orm.load_code(label) for key, label in campaign['codes'].items()
             if key != 'md' or 'md_stability' in (campaign.get('validation') or {}).get('properties', [])}
    structures = {name: orm.StructureData(ase=material_atoms(material['source']))
                  for name, material in campaign['materials'].items()}
    dft = campaign['dft']
    ecutwfc, ecutrho = campaign_cutoffs(campaign)
    parameters = {namelist: dict(entries) for namelist, entries in dft.get('parameters', {}).items()}
    parameters.setdefault('SYSTEM', {}).update(ecutwfc=ecutwfc, ecutrho=ecutrho)
    pw_base = {'pw': {'parameters': parameters}}
    if dft.get('kpoints_distance'):
        pw_base['kpoints_distance'] = dft['kpoints_distance']
    overrides = {'pw_base': pw_base, 'isolated_atoms': dft['isolated_atoms']}
    for key in ('max_failure_fraction', 'max_concurrent'):
        if dft.get(key) is not None:
            overrides[key] = dft[key]
    from aiida_quantumespresso.common.types import ElectronicType

    resources = campaign.get('resources', {})
    try:
        labeling = DftLabelingWorkChain.get_builder_from_protocol(
            codes['pw'], structures, protocol=dft['protocol'], pseudo_family=campaign['pseudo_family'],
            overrides=overrides, options=resources.get('pw'), electronic_type=ElectronicType(dft['electronic_type']))
    except ValueError as exception:
        raise CampaignError([f'{filename}:dft: {exception}']) from None

    training_settings = campaign['training']
    training_overrides = {key: training_settings[key] for key in ('committee_size', 'seed', 'split_fractions')
                          if key in training_settings}
    training_overrides['mace'] = dict(training_settings['mace'])
    training = TrainingWorkChain.get_builder_from_protocol(
        codes['mace_train'], TrainingSet(), protocol=training_settings['protocol'], overrides=training_overrides,
        evaluate_code=codes['evaluate'], options=resources.get('mace_train'),
        evaluate_options=resources.get('evaluate'))
    training = _pruned(training, 'dataset')
    if training_settings['mode'] == 'finetune':
        mace = training['training']['mace']
        parameters = {key: value for key, value in mace['parameters'].get_dict().items()
                      if key not in FIXED_BY_FOUNDATION}
        mace['parameters'] = orm.Dict(parameters)
        mace['foundation_model'] = load_foundation_model(training_settings['foundation'])
        mace['finetune'] = orm.Str('naive')

    builder = CampaignWorkChain.get_builder()
    builder.campaign = orm.Dict({key: campaign[key] for key in
                                 ('name', 'description', 'classes', 'materials', 'elements', 'validation',
                                  'transferability')})
    builder.structures = structures
    builder.labeling = _pruned(labeling, 'structures', 'config_types')
    builder.training = training
    builder.evaluate_code = codes['evaluate']
    if resources.get('evaluate'):
        builder.evaluate_options = orm.Dict(resources['evaluate'])
    validation = campaign.get('validation')
    if validation:
        first = structures[next(iter(campaign['classes'].values()))[0]]
        overrides = {'properties': validation['properties']}
        if validation['thresholds']:
            overrides['thresholds'] = validation['thresholds']
        if validation.get('relax') is not None:
            overrides['relax'] = validation['relax']
        builder.validation = _pruned(
            ValidationWorkChain.get_builder_from_protocol(codes['evaluate'], {}, first,
                                                         protocol=validation['protocol'], overrides=overrides),
            'structure', 'mlip', 'dft', 'md_code')
        if 'md' in codes:
            builder.md_code = codes['md']
    if campaign.get('refinement'):
        builder.refinement = orm.Dict(refinement_inputs(campaign['refinement']))
    builder.metadata.label = campaign['name']
    builder.metadata.description = campaign['description'] or f'campaign {campaign["name"]}'
    return builder
