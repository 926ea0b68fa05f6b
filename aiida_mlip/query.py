"""Provenance queries on models: what a model was trained on, which models cover given elements, how it validated.

Every answer comes from the AiiDA graph through ``QueryBuilder`` and is returned as plain dataclasses (``to_dict()``
gives JSON-ready dicts), so scripts and the ``aiida-mlip query`` commands share one implementation. How the graph
is linked (the recipes in docs/queries.md follow the same paths):

* ``mlip.model`` <-CREATE- ``MaceTrainCalculation`` <-INPUT- ``train``/``valid``/``test``/``replay_dataset``
  (``mlip.dataset``) and ``foundation_model`` (``mlip.model``: the foundation chain continues from there);
* a dataset <-CREATE- ``split_dataset``/``merge_datasets`` <-INPUT- its parent datasets, down to the datasets made
  by ``collect_labeled_frames`` from ``PwBaseWorkChain`` outputs;
* each frame names the PwCalculation that labeled it (attribute ``source_uuids``, the creator of the
  ``output_parameters`` the frame was read from); the calculation's ``structure``, ``parameters``, ``kpoints`` and
  ``pseudos__<kind>`` inputs give formula, cutoffs, k-points and UPF files, and the pseudo family is the
  ``pseudo.family*`` group holding those files;
* a ``ValidationWorkChain`` has the model among its ``mlip.models`` inputs and the verdict in output ``comparison``.
"""
from __future__ import annotations

import collections
import dataclasses

from aiida import orm
from aiida.common.links import LinkType

from aiida_mlip.data.dataset import TrainingSet
from aiida_mlip.data.model import MlipModel

PW_PROCESS_TYPE = 'aiida.calculations:quantumespresso.pw'
VALIDATION_PROCESS_TYPE = 'aiida.workflows:mlip.validation'
#: Input port of the training calculation that carries the model being fine-tuned.
FOUNDATION_PORT = 'foundation_model'
#: Largest number of values in one ``in`` filter (SQLite limits bound parameters).
_CHUNK = 500


# ---- records -----------------------------------------------------------------------------------------------------
class _Record:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ProcessRecord(_Record):
    pk: int
    uuid: str
    process_label: str | None
    exit_status: int | None
    process_state: str | None
    ctime: str

    def __str__(self):
        return f'{self.process_label}<{self.pk}>'


@dataclasses.dataclass
class ModelRecord(_Record):
    pk: int
    uuid: str
    label: str
    origin: str | None
    elements: list
    r_max: float | None
    dtype: str | None
    sha256: str | None
    foundation_name: str | None
    source: str | None
    ctime: str
    #: pk of the calculation that created it (None for imported and foundation files).
    creator_pk: int | None


@dataclasses.dataclass
class DatasetRecord(_Record):
    pk: int
    uuid: str
    label: str
    #: Input ports of the training calculation this dataset filled (train, valid, test, replay_dataset); empty for
    #: the datasets it was split or merged from.
    roles: list
    #: 0 for the training inputs, 1 for the datasets they were made from, ...
    depth: int
    n_frames: int | None
    elements: list
    config_types: dict
    fingerprint_hash: str | None
    pseudo_family: str | None
    ecutwfc: float | None
    ecutrho: float | None
    creator: str | None
    creator_pk: int | None
    #: UUIDs of the datasets this one was split or merged from.
    parents: list


@dataclasses.dataclass
class PwRecord(_Record):
    pk: int
    uuid: str
    formula: str
    n_atoms: int
    ecutwfc: float | None
    ecutrho: float | None
    kpoints_mesh: list | None
    kpoints_offset: list | None
    #: Number of explicit k-points when the calculation got a list rather than a mesh.
    n_kpoints: int | None
    #: Pseudo family groups that hold every UPF file of the calculation.
    pseudo_families: list
    #: element (kind) -> md5 of the UPF file.
    pseudo_md5s: dict
    exit_status: int | None
    #: How many frames of the training inputs this calculation labeled, and in which of them.
    n_frames: int
    roles: list


@dataclasses.dataclass
class Lineage(_Record):
    model: ModelRecord
    #: The MaceTrainCalculation(s) of this model: every attempt of its restart workchain, the creator last.
    training_calculations: list
    #: The workflows that ran the training, innermost first (MaceTrainBaseWorkChain, TrainingWorkChain, ...).
    workflows: list
    datasets: list
    pw_calculations: list
    #: Label sources that are not pw.x runs (e.g. MLIP predictions turned into a dataset).
    other_sources: list
    #: Frames whose source is unknown or no longer in the database.
    n_frames_without_source: int
    #: The model it was fine-tuned from, that model's foundation, ... (empty when trained from scratch).
    foundations: list


@dataclasses.dataclass
class ValidationRecord(_Record):
    process: ProcessRecord
    structure_formula: str | None
    properties: list
    #: The input port under ``mlip.models`` that received the model (e.g. ``model``, ``member_0``).
    port: str
    #: UUIDs of all models of the validated committee.
    models: list
    passed: bool | None
    checks: dict
    failed: list
    comparison: dict | None
    #: ``Workflow<pk> (call label)`` when another workflow ran the validation.
    caller: str | None


# ---- helpers -----------------------------------------------------------------------------------------------------
def as_model(model) -> MlipModel:
    """An MlipModel from a node, pk or UUID; ValueError naming what was found otherwise."""
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    if isinstance(model, MlipModel):
        return model
    try:
        node = orm.load_node(model)
    except (NotExistent, MultipleObjectsError, ValueError, TypeError) as exception:
        raise ValueError(f'no node `{model}`: {exception}') from exception
    if not isinstance(node, MlipModel):
        raise ValueError(f'node {node.pk} is a {type(node).__name__}, not an mlip.model')
    return node


def _chunks(values):
    values = list(values)
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


def _process_record(node) -> ProcessRecord:
    state = node.process_state
    return ProcessRecord(pk=node.pk, uuid=node.uuid, process_label=node.process_label, exit_status=node.exit_status,
                         process_state=state.value if state is not None else None, ctime=node.ctime.isoformat())


def _model_record(node: MlipModel) -> ModelRecord:
    attributes = node.base.attributes
    creator = node.creator
    return ModelRecord(
        pk=node.pk, uuid=node.uuid, label=node.label, origin=attributes.get('origin', None),
        elements=list(attributes.get('elements', [])), r_max=attributes.get('r_max', None),
        dtype=attributes.get('dtype', None), sha256=attributes.get('sha256', None),
        foundation_name=attributes.get('foundation_name', None), source=attributes.get('source', None),
        ctime=node.ctime.isoformat(), creator_pk=creator.pk if creator is not None else None,
    )


def _formula(kinds: list, sites: list) -> tuple[str, int]:
    """Hill formula and atom count from the ``kinds``/``sites`` attributes of a StructureData (no node load)."""
    from aiida.orm.nodes.data.structure import get_formula

    symbol_of = {kind['name']: ''.join(kind['symbols']) for kind in kinds}
    symbols = [symbol_of[site['kind_name']] for site in sites]
    return get_formula(symbols, mode='hill'), len(symbols)


# ---- lineage -----------------------------------------------------------------------------------------------------
def _training_processes(creator) -> tuple[list, list]:
    """(every MaceTrainCalculation attempt of the creator's caller, creator last; the caller chain, innermost first)."""
    workflows, caller = [], creator.caller
    while caller is not None:
        workflows.append(_process_record(caller))
        caller = caller.caller
    attempts = [creator]
    if creator.caller is not None:
        query = orm.QueryBuilder()
        query.append(orm.WorkflowNode, filters={'id': creator.caller.pk}, tag='caller')
        query.append(orm.CalcJobNode, with_incoming='caller', edge_filters={'type': LinkType.CALL_CALC.value},
                     filters={'process_type': creator.process_type, 'id': {'!==': creator.pk}}, project='*')
        query.order_by({orm.CalcJobNode: {'ctime': 'asc'}})
        attempts = [node for (node,) in query.iterall()] + [creator]
    return [_process_record(node) for node in attempts], workflows


def _datasets(inputs: dict) -> list[DatasetRecord]:
    """The training input datasets (``{pk: [roles]}``) and, level by level, the datasets they were made from."""
    records, depth, frontier = {}, 0, dict(inputs)
    while frontier:
        query = orm.QueryBuilder()
        query.append(TrainingSet, filters={'id': {'in': list(frontier)}}, project=[
            'id', 'uuid', 'label', 'attributes.n_frames', 'attributes.elements', 'attributes.config_types',
            'attributes.fingerprint_hash', 'attributes.fingerprint'])
        for pk, uuid, label, n_frames, elements, config_types, fingerprint_hash, fingerprint in query.iterall():
            fingerprint = fingerprint or {}
            records[pk] = DatasetRecord(
                pk=pk, uuid=uuid, label=label, roles=sorted(frontier[pk]), depth=depth, n_frames=n_frames,
                elements=elements or [], config_types=config_types or {}, fingerprint_hash=fingerprint_hash,
                pseudo_family=fingerprint.get('pseudo_family'), ecutwfc=fingerprint.get('ecutwfc'),
                ecutrho=fingerprint.get('ecutrho'), creator=None, creator_pk=None, parents=[])
        # dataset <-CREATE- calcfunction, and that calcfunction <-INPUT- parent datasets
        query = orm.QueryBuilder()
        query.append(TrainingSet, filters={'id': {'in': list(frontier)}}, tag='dataset', project='id')
        query.append(orm.CalculationNode, with_outgoing='dataset', edge_filters={'type': LinkType.CREATE.value},
                     project=['id', 'attributes.process_label'])
        for pk, creator_pk, creator_label in query.iterall():
            records[pk].creator, records[pk].creator_pk = f'{creator_label}<{creator_pk}>', creator_pk
        query = orm.QueryBuilder()
        query.append(TrainingSet, filters={'id': {'in': list(frontier)}}, tag='dataset', project='id')
        query.append(orm.CalculationNode, with_outgoing='dataset', edge_filters={'type': LinkType.CREATE.value},
                     tag='creator')
        query.append(TrainingSet, with_outgoing='creator', edge_filters={'type': LinkType.INPUT_CALC.value},
                     project=['id', 'uuid'])
        parents = {}
        for pk, parent_pk, parent_uuid in query.iterall():
            records[pk].parents.append(parent_uuid)
            if parent_pk not in records:
                parents[parent_pk] = []
        depth += 1
        frontier = parents
    for record in records.values():
        record.parents.sort()
    return sorted(records.values(), key=lambda r: (r.depth, r.pk))


def _source_counts(datasets: list[DatasetRecord]) -> tuple[dict, dict, int]:
    """Per label source UUID: number of frames and roles, over the training inputs; plus frames without source."""
    counts, roles, unknown = collections.Counter(), collections.defaultdict(set), 0
    inputs = [record for record in datasets if record.depth == 0]
    query = orm.QueryBuilder().append(TrainingSet, filters={'id': {'in': [r.pk for r in inputs]}},
                                      project=['id', 'attributes.source_uuids'])
    sources_of = dict(query.all())
    for record in inputs:
        for uuid in sources_of.get(record.pk) or []:
            if not uuid:
                unknown += 1
                continue
            counts[uuid] += 1
            roles[uuid].update(record.roles)
    return counts, roles, unknown


def _pw_records(uuids, counts: dict, roles: dict) -> tuple[list, list, set]:
    """(PwRecords, ProcessRecords of other sources, UUIDs found) for the label source UUIDs."""
    pw_pks, others, found = [], [], set()
    for chunk in _chunks(uuids):
        query = orm.QueryBuilder().append(orm.ProcessNode, filters={'uuid': {'in': chunk}}, project='*')
        for (node,) in query.iterall():
            found.add(node.uuid)
            if node.process_type == PW_PROCESS_TYPE:
                pw_pks.append(node.pk)
            else:
                others.append(_process_record(node))

    pseudos = collections.defaultdict(dict)  # calc pk -> {kind: (pseudo pk, md5)}
    families = collections.defaultdict(set)  # pseudo pk -> family labels
    records = []
    for chunk in _chunks(pw_pks):
        query = orm.QueryBuilder()
        query.append(orm.CalcJobNode, filters={'id': {'in': chunk}}, tag='calc',
                     project=['id', 'uuid', 'attributes.exit_status'])
        query.append(orm.StructureData, with_outgoing='calc', edge_filters={'label': 'structure'},
                     project=['attributes.kinds', 'attributes.sites'])
        query.append(orm.Dict, with_outgoing='calc', edge_filters={'label': 'parameters'},
                     project=['attributes.SYSTEM'])
        query.append(orm.KpointsData, with_outgoing='calc', edge_filters={'label': 'kpoints'}, project='attributes')
        records += query.all()

        query = orm.QueryBuilder()
        query.append(orm.CalcJobNode, filters={'id': {'in': chunk}}, tag='calc', project='id')
        query.append(orm.Data, with_outgoing='calc', edge_filters={'label': {'like': 'pseudos__%'}}, tag='pseudo',
                     edge_project='label', project=['id', 'attributes.md5'])
        for calc_pk, pseudo_pk, md5, label in query.iterall():
            pseudos[calc_pk][label.removeprefix('pseudos__')] = (pseudo_pk, md5)
    pseudo_pks = {pk for kinds in pseudos.values() for pk, _ in kinds.values()}
    for chunk in _chunks(pseudo_pks):
        query = orm.QueryBuilder()
        query.append(orm.Group, filters={'type_string': {'like': 'pseudo.family%'}}, tag='family', project='label')
        query.append(orm.Data, with_group='family', filters={'id': {'in': chunk}}, project='id')
        for family, pseudo_pk in query.iterall():
            families[pseudo_pk].add(family)

    pw = []
    for pk, uuid, exit_status, kinds, sites, system, kpoints in records:
        formula, n_atoms = _formula(kinds, sites)
        system, kpoints = system or {}, kpoints or {}
        used = pseudos.get(pk, {})
        common = set.intersection(*(families[pseudo_pk] for pseudo_pk, _ in used.values())) if used else set()
        explicit = kpoints.get('array|kpoints')
        pw.append(PwRecord(
            pk=pk, uuid=uuid, formula=formula, n_atoms=n_atoms, ecutwfc=system.get('ecutwfc'),
            ecutrho=system.get('ecutrho'), kpoints_mesh=kpoints.get('mesh'), kpoints_offset=kpoints.get('offset'),
            n_kpoints=explicit[0] if explicit else None, pseudo_families=sorted(common),
            pseudo_md5s={kind: md5 for kind, (_, md5) in sorted(used.items())}, exit_status=exit_status,
            n_frames=counts[uuid], roles=sorted(roles[uuid]),
        ))
    return sorted(pw, key=lambda r: r.pk), sorted(others, key=lambda r: r.pk), found


def foundation_chain(model) -> list[ModelRecord]:
    """The model ``model`` was fine-tuned from, that model's foundation, and so on (empty: trained from scratch)."""
    chain, seen, current = [], set(), as_model(model)
    while current.pk not in seen:
        seen.add(current.pk)
        query = orm.QueryBuilder()
        query.append(MlipModel, filters={'id': current.pk}, tag='model')
        query.append(orm.ProcessNode, with_outgoing='model', edge_filters={'type': LinkType.CREATE.value},
                     tag='training')
        query.append(MlipModel, with_outgoing='training', edge_filters={'label': FOUNDATION_PORT}, project='*')
        found = query.first(flat=True)
        if found is None:
            break
        chain.append(_model_record(found))
        current = found
    return chain


def lineage(model) -> Lineage:
    """Everything a model was made from: training calculation(s) and workflows, datasets (the training inputs and
    the datasets they were split or merged from), every PwCalculation that labeled a frame, and the foundation chain.

    :param model: an ``mlip.model`` node, its pk or UUID.
    """
    model = as_model(model)
    creator = model.creator
    if creator is None:  # imported or foundation file: no training in this database
        return Lineage(model=_model_record(model), training_calculations=[], workflows=[], datasets=[],
                       pw_calculations=[], other_sources=[], n_frames_without_source=0, foundations=[])
    training, workflows = _training_processes(creator)

    query = orm.QueryBuilder()
    query.append(orm.ProcessNode, filters={'id': creator.pk}, tag='training')
    query.append(TrainingSet, with_outgoing='training', edge_project='label', project='id')
    inputs = collections.defaultdict(list)
    for pk, label in query.iterall():
        inputs[pk].append(label)
    datasets = _datasets(inputs)

    counts, roles, unknown = _source_counts(datasets)
    pw, others, found = _pw_records(sorted(counts), counts, roles)
    unknown += sum(count for uuid, count in counts.items() if uuid not in found)
    return Lineage(model=_model_record(model), training_calculations=training, workflows=workflows,
                   datasets=datasets, pw_calculations=pw, other_sources=others, n_frames_without_source=unknown,
                   foundations=foundation_chain(model))


# ---- models covering elements ------------------------------------------------------------------------------------
def models_covering(elements, exact: bool = False) -> list[ModelRecord]:
    """The ``mlip.model`` nodes whose elements include all of ``elements`` (with ``exact``: are exactly them).

    :param elements: element symbols, as a list or a comma-separated string (``'Si,Ge'``).
    """
    if isinstance(elements, str):
        elements = elements.split(',')
    elements = sorted({element.strip() for element in elements if element.strip()})
    if not elements:
        raise ValueError('give at least one element symbol')
    condition = {'contains': elements}
    if exact:
        condition = {'and': [condition, {'of_length': len(elements)}]}
    query = orm.QueryBuilder()
    query.append(MlipModel, filters={'attributes.elements': condition}, project='*')
    query.order_by({MlipModel: {'id': 'asc'}})
    return [_model_record(node) for (node,) in query.iterall()]


# ---- validation results ------------------------------------------------------------------------------------------
def validation_results(model) -> list[ValidationRecord]:
    """The ValidationWorkChains that validated ``model`` (alone or in a committee), oldest first, with verdicts."""
    model = as_model(model)
    query = orm.QueryBuilder()
    query.append(MlipModel, filters={'id': model.pk}, tag='model')
    query.append(orm.WorkflowNode, with_incoming='model', filters={'process_type': VALIDATION_PROCESS_TYPE},
                 edge_filters={'label': {'like': 'mlip__models__%'}}, edge_project='label', project='*',
                 tag='validation')
    query.order_by({'validation': {'ctime': 'asc'}})
    rows = query.all()
    if not rows:
        return []
    pks = [node.pk for node, _ in rows]

    comparisons, models, structures, properties = {}, collections.defaultdict(list), {}, {}
    query = orm.QueryBuilder()
    query.append(orm.WorkflowNode, filters={'id': {'in': pks}}, tag='validation', project='id')
    query.append(orm.Dict, with_incoming='validation', edge_filters={'label': 'comparison'}, project='attributes')
    comparisons.update(query.all())
    query = orm.QueryBuilder()
    query.append(orm.WorkflowNode, filters={'id': {'in': pks}}, tag='validation', project='id')
    query.append(MlipModel, with_outgoing='validation', edge_filters={'label': {'like': 'mlip__models__%'}},
                 project='uuid')
    for pk, uuid in query.iterall():
        models[pk].append(uuid)
    query = orm.QueryBuilder()
    query.append(orm.WorkflowNode, filters={'id': {'in': pks}}, tag='validation', project='id')
    query.append(orm.StructureData, with_outgoing='validation', edge_filters={'label': 'structure'},
                 project=['attributes.kinds', 'attributes.sites'])
    structures.update({pk: _formula(kinds, sites)[0] for pk, kinds, sites in query.iterall()})
    query = orm.QueryBuilder()
    query.append(orm.WorkflowNode, filters={'id': {'in': pks}}, tag='validation', project='id')
    query.append(orm.List, with_outgoing='validation', edge_filters={'label': 'properties'}, project='attributes.list')
    properties.update(query.all())

    results = []
    for node, label in rows:
        comparison = comparisons.get(node.pk)
        verdict = (comparison or {}).get('verdict', {})
        caller = node.caller
        call_label = None
        if caller is not None:
            call_label = node.base.links.get_incoming(link_type=LinkType.CALL_WORK).one().link_label
        results.append(ValidationRecord(
            process=_process_record(node), structure_formula=structures.get(node.pk),
            properties=properties.get(node.pk) or [], port=label.removeprefix('mlip__models__'),
            models=sorted(models[node.pk]), passed=verdict.get('passed'), checks=verdict.get('checks', {}),
            failed=verdict.get('failed', []), comparison=comparison,
            caller=f'{caller.process_label}<{caller.pk}> ({call_label})' if caller is not None else None,
        ))
    return results
