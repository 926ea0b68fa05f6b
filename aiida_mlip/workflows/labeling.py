"""``mlip.labeling``: label many structures with pw.x and collect the accepted frames into one ``mlip.dataset``.

One PwBaseWorkChain per structure, all running concurrently, with identical cutoffs, pseudopotentials,
smearing and k-point spacing, so every frame of the dataset is a label of the same DFT. Frames whose
calculation failed or whose labels fail quality control are dropped and listed with the reason.
"""
from __future__ import annotations

import copy

import numpy as np
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, while_
from aiida_quantumespresso.workflows.protocols.utils import recursive_merge
from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain

from aiida_mlip.calculations.datasets import collect_labeled_frames, frame_link_prefix
from aiida_mlip.calculations.sampling import isolated_atom
from aiida_mlip.data.dataset import DEFAULT_CONFIG_TYPE, ISOLATED_ATOM
from aiida_mlip.protocols import ProtocolMixin
from aiida_mlip.workflows.checks import code_problem, elements_of, structures_problem

#: Net force per atom above this (eV/Å) is reported as a warning: it signals numerical noise (docs/sources.md).
NET_FORCE_WARNING = 1e-3

#: What a per-structure override may change: never cutoffs, pseudopotentials or k-points, which must be equal
#: for all frames of one dataset.
ALLOWED_STRUCTURE_OVERRIDES = {'max_iterations', 'pw'}
ALLOWED_PW_OVERRIDES = {'parameters', 'metadata'}
ALLOWED_PARAMETER_SECTIONS = {'ELECTRONS'}


def labeled_outputs(node) -> tuple[object | None, list[str]]:
    """The outputs holding the labels of one PwBaseWorkChain (None if it has none), and a warning if salvaged.

    aiida-core 2.9 gap: a daemon worker killed between a CalcJob's upload and its next checkpoint leaves the job
    marked as uploaded but its ``remote_folder`` output unlinked; the resumed job skips the upload, runs pw.x and
    is parsed, and its PwBaseWorkChain fails with exit status 11 (missing output). The labels are there: take them
    from that PwCalculation instead of running pw.x again.
    """
    if node.is_finished_ok:
        return node.outputs, []
    missing_output = PwBaseWorkChain.exit_codes.ERROR_MISSING_OUTPUT.status
    if node.exit_status != missing_output:
        return None, []
    calculations = sorted((called for called in node.called if isinstance(called, orm.CalcJobNode)),
                          key=lambda called: called.ctime)
    if not calculations:
        return None, []
    calculation = calculations[-1]
    outputs = calculation.outputs
    if calculation.exit_status not in (0, missing_output) or 'remote_folder' in outputs \
            or 'output_parameters' not in outputs or 'output_trajectory' not in outputs:
        return None, []
    return outputs, [f'labels taken from PwCalculation<{calculation.pk}> (exit status {calculation.exit_status}): '
                     f'its remote_folder output is missing, so PwBaseWorkChain<{node.pk}> failed with exit status 11']


def load_pseudo_family(label: str):
    """The pseudo family group ``label``, or a ValueError that lists what is installed."""
    from aiida.common.exceptions import NotExistent
    from aiida_pseudo.groups.family import PseudoPotentialFamily

    try:
        return PseudoPotentialFamily.collection.get(label=label)
    except NotExistent:
        installed = [group.label for group in PseudoPotentialFamily.collection.all()]
        raise ValueError(
            f'pseudo family `{label}` is not installed (installed: {installed or "none"}); '
            'create one with `aiida-mlip setup pseudos --label LABEL`'
        ) from None


def family_problem(label: str, elements) -> str | None:
    """Why the family cannot label these elements, or None."""
    try:
        family = load_pseudo_family(label)
    except ValueError as exception:
        return str(exception)
    missing = sorted(set(elements) - set(family.elements))
    if missing:
        return (
            f'pseudo family `{label}` has no pseudopotential for {", ".join(missing)} '
            f'(it covers {", ".join(sorted(family.elements))})'
        )
    return None


def structure_overrides_problem(overrides: dict, keys) -> str | None:
    """Per-structure overrides may only name known structures and only change electronic/iteration settings."""
    for key, override in overrides.items():
        if key not in keys:
            return f'structure_overrides names `{key}`, which is not among the structures'
        extra = set(override) - ALLOWED_STRUCTURE_OVERRIDES
        extra |= {f'pw.{k}' for k in set(override.get('pw', {})) - ALLOWED_PW_OVERRIDES}
        extra |= {f'pw.parameters.{k}' for k in set(override.get('pw', {}).get('parameters', {}))
                  - ALLOWED_PARAMETER_SECTIONS}
        if extra:
            return (
                f'structure_overrides of `{key}` changes {sorted(extra)}: only max_iterations, pw.metadata and '
                'pw.parameters.ELECTRONS may differ between frames of one dataset'
            )
    return None


def validate_structures(value, _):
    """Every structure must be computable; the list must not be empty."""
    return structures_problem(dict(value or {}))


def relative_pw_cost(structure: orm.StructureData) -> int:
    """A pw.x run's cost up to a constant, for the launch order only: bands x plane waves x k-points at a fixed
    k-point spacing grows as the number of atoms squared."""
    return len(structure.sites) ** 2


def validate_max_concurrent(value, _):
    """At least one pw.x run must be allowed at a time."""
    if value is not None and value.value < 1:
        return f'max_concurrent must be a positive number of pw.x runs, got {value.value}'
    return None


def validate_inputs(inputs, _):
    """Checks that need several inputs: family covers all elements, code is pw.x, overrides are allowed."""
    structures = dict(inputs.get('structures', {}))
    if not structures:
        return None  # reported by the namespace validator
    problem = family_problem(inputs['pseudo_family'].value, elements_of(structures.values()))
    if problem:
        return problem
    problem = code_problem(inputs['pw_base']['pw'].get('code'), 'quantumespresso.pw', 'DFT labeling')
    if problem:
        return problem
    if 'structure_overrides' in inputs:
        problem = structure_overrides_problem(inputs['structure_overrides'].get_dict(), structures)
        if problem:
            return problem
    if 'config_types' in inputs:
        unknown = set(inputs['config_types'].get_dict()) - set(structures)
        if unknown:
            return f'config_types names structures that were not given: {sorted(unknown)}'
    fraction = inputs['max_failure_fraction'].value
    if not 0 <= fraction <= 1:
        return f'max_failure_fraction must lie in [0, 1], got {fraction}'
    return None


def bands_for_smearing(electrons: float) -> int:
    """Bands of a smeared (metallic) pw.x run: the occupied ones plus max(8, 30 %).

    pw.x's own default (max(1.2 N/2, N/2 + 4)) left the highest band of 4-atom Cu cells and rattled Si8 cells
    occupied above aiida-quantumespresso's 0.005 check, so every such cell ran twice (its insufficient-bands handler
    adds 5 % or 4 bands and restarts); with these bands the rattled Si8 cells pass it the first time
    (tests/test_labeling.py).
    """
    occupied = int(np.ceil(electrons / 2))
    return occupied + max(8, int(np.ceil(0.3 * occupied)))


class DftLabelingWorkChain(ProtocolMixin, WorkChain):
    """Label structures with pw.x through PwBaseWorkChain and collect them into a quality-checked dataset."""

    _protocol_name = 'labeling'

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input_namespace(
            'structures', valid_type=orm.StructureData, dynamic=True, validator=validate_structures,
            help='The structures to label; the keys name the frames in the quality report.',
        )
        spec.input(
            'pseudo_family', valid_type=orm.Str,
            help='Label of an aiida-pseudo family (with recommended cutoffs) that covers every element.',
        )
        spec.expose_inputs(
            PwBaseWorkChain, namespace='pw_base',
            exclude=('clean_workdir', 'pw.structure', 'pw.pseudos', 'pw.parent_folder'),
            namespace_options={'help': 'PwBaseWorkChain inputs shared by all frames (pseudos come from the family).'},
        )
        spec.input('config_types', valid_type=orm.Dict, required=False,
                   help='Optional map structure key -> config_type (default `Default`), kept per frame.')
        spec.input('structure_overrides', valid_type=orm.Dict, required=False,
                   help='Optional map structure key -> overrides of max_iterations, pw.metadata or '
                        'pw.parameters.ELECTRONS for that structure only.')
        spec.input('conv_thr_per_atom', valid_type=orm.Float, required=False,
                   help='SCF threshold per atom (Ry); conv_thr of each frame is this times its atom count.')
        spec.input('isolated_atoms', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Also compute each element alone in a box: IsolatedAtom frames give MACE its E0s.')
        spec.input('isolated_atom_box', valid_type=orm.Float, default=lambda: orm.Float(10.0),
                   help='Side (Å) of the cubic box of the isolated-atom calculations.')
        spec.input('max_force', valid_type=orm.Float, default=lambda: orm.Float(10.0),
                   help='Frames with any force component norm above this (eV/Å) are dropped.')
        spec.input('max_failure_fraction', valid_type=orm.Float, default=lambda: orm.Float(0.2),
                   help='Largest tolerated fraction of dropped frames; above it the workchain fails (501).')
        spec.input('clean_workdir', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Clean the remote folders of the pw.x runs when done.')
        spec.input('max_concurrent', valid_type=orm.Int, required=False, serializer=orm.to_aiida_type,
                   validator=validate_max_concurrent,
                   help='Largest number of pw.x runs of this labeling in flight at once: the most expensive frames '
                        'start first and each run that ends frees its slot for the next (default: all at once).')
        spec.inputs.validator = validate_inputs

        spec.outline(
            cls.setup,
            while_(cls.frames_left)(
                cls.run_labeling,
            ),
            cls.await_labeling,
            cls.inspect_labeling,
            cls.collect_dataset,
            cls.results,
        )
        spec.output('dataset', valid_type=orm.Data,
                    help='The `mlip.dataset` of the accepted frames (also attached on exit 501, for inspection).')
        spec.output('quality_report', valid_type=orm.Dict,
                    help='Accepted frames, dropped frames with their reasons, warnings, failure fraction.')
        spec.exit_code(401, 'ERROR_ISOLATED_ATOM_FAILED',
                       message='The isolated-atom calculation of {elements} failed: no E0 reference.')
        spec.exit_code(402, 'ERROR_NO_FRAME_LABELED', message='Not a single frame passed: no dataset.')
        spec.exit_code(501, 'ERROR_TOO_MANY_REJECTED_FRAMES',
                       message='{fraction:.0%} of the frames were dropped, above the tolerated {limit:.0%}.')

    @classmethod
    def get_builder_from_protocol(cls, code, structures, protocol=None, overrides=None, pseudo_family=None,
                                  options=None, config_types=None, **kwargs):
        """A builder with identical DFT settings for all ``structures`` (a list or a dict of StructureData).

        :param pseudo_family: label of the pseudo family; required offline (the protocol's SSSP is not installed).
        :param overrides: labeling inputs and, under ``pw_base``, PwBaseWorkChain protocol overrides.
        :param options: ``metadata.options`` of the pw.x jobs; ``withmpi`` defaults to what the code declares.
        :param kwargs: passed on to ``PwBaseWorkChain.get_builder_from_protocol`` (e.g. ``electronic_type``).
        """
        if isinstance(code, str):
            code = orm.load_code(code)
        if not isinstance(structures, dict):
            structures = {f'structure_{index:03d}': s for index, s in enumerate(structures)}
        problem = structures_problem(structures) or code_problem(code, 'quantumespresso.pw', 'DFT labeling')
        if problem:
            raise ValueError(problem)
        inputs = cls.get_protocol_inputs(protocol, overrides)
        protocol = protocol or cls.get_default_protocol()

        pw_overrides = copy.deepcopy(inputs.get('pw_base', {}))
        family_label = pseudo_family or pw_overrides.get('pseudo_family')
        if family_label is None:
            raise ValueError('pass `pseudo_family`: the protocol default (SSSP) cannot be installed offline')
        elements = elements_of(structures.values())
        problem = family_problem(family_label, elements)
        if problem:
            raise ValueError(problem)
        family = load_pseudo_family(family_label)
        pw_overrides['pseudo_family'] = family_label
        system = pw_overrides.setdefault('pw', {}).setdefault('parameters', {}).setdefault('SYSTEM', {})
        if not ('ecutwfc' in system and 'ecutrho' in system):
            ecutwfc, ecutrho = family.get_recommended_cutoffs(elements=tuple(sorted(elements)), unit='Ry')
            system.setdefault('ecutwfc', ecutwfc)
            system.setdefault('ecutrho', ecutrho)

        options = dict(options or {})
        if code.with_mpi is not None:
            options.setdefault('withmpi', code.with_mpi)
        reference = next(iter(structures.values()))
        pw_base = PwBaseWorkChain.get_builder_from_protocol(
            code, reference, protocol=protocol, overrides=pw_overrides, options=options, **kwargs
        )
        pw_base['pw'].pop('structure', None)
        pw_base['pw'].pop('pseudos', None)
        pw_base.pop('clean_workdir', None)
        meta = PwBaseWorkChain.get_protocol_inputs(protocol, pw_overrides)['meta_parameters']

        builder = cls.get_builder()
        builder.structures = structures
        builder.pseudo_family = orm.Str(family_label)
        builder.pw_base = pw_base
        builder.conv_thr_per_atom = orm.Float(meta['conv_thr_per_atom'])
        builder.isolated_atoms = orm.Bool(inputs['isolated_atoms'])
        builder.isolated_atom_box = orm.Float(inputs['isolated_atom_box'])
        builder.max_force = orm.Float(inputs['max_force'])
        builder.max_failure_fraction = orm.Float(inputs['max_failure_fraction'])
        if config_types:
            builder.config_types = orm.Dict(dict(config_types))
        if inputs.get('structure_overrides'):
            builder.structure_overrides = orm.Dict(inputs['structure_overrides'])
        if inputs.get('max_concurrent') is not None:
            builder.max_concurrent = inputs['max_concurrent']
        return builder

    # ---- outline -----------------------------------------------------------------------------------------
    def setup(self):
        """Order the frames: given structures (sorted by key), then one isolated atom per element if asked."""
        config_types = self.inputs.config_types.get_dict() if 'config_types' in self.inputs else {}
        self.ctx.frames = [
            {'key': key, 'structure': structure, 'config_type': config_types.get(key, DEFAULT_CONFIG_TYPE)}
            for key, structure in sorted(self.inputs.structures.items())
        ]
        if self.inputs.isolated_atoms.value:
            for element in sorted(elements_of(self.inputs.structures.values())):
                structure = isolated_atom(orm.Str(element), self.inputs.isolated_atom_box)
                self.ctx.frames.append({'key': f'isolated_{element}', 'structure': structure,
                                        'config_type': ISOLATED_ATOM})
        self.ctx.family = load_pseudo_family(self.inputs.pseudo_family.value)
        # launch order: with a cap, the most expensive first, so that no long run starts last and ends alone
        order = range(len(self.ctx.frames))
        if 'max_concurrent' in self.inputs:
            order = sorted(order, key=lambda index: -relative_pw_cost(self.ctx.frames[index]['structure']))
        self.ctx.launch_order = list(order)
        self.ctx.next_frame = 0
        self.ctx.in_flight = []

    def _pw_base_inputs(self, frame: dict) -> AttributeDict:
        inputs = AttributeDict(self.exposed_inputs(PwBaseWorkChain, namespace='pw_base'))
        structure = frame['structure']
        inputs.pw.structure = structure
        inputs.pw.pseudos = self.ctx.family.get_pseudos(structure=structure)
        parameters = inputs.pw.parameters.get_dict()
        if 'conv_thr_per_atom' in self.inputs:
            parameters.setdefault('ELECTRONS', {})['conv_thr'] = self.inputs.conv_thr_per_atom.value * len(
                structure.sites
            )
        overrides = {}
        if 'structure_overrides' in self.inputs:
            overrides = copy.deepcopy(self.inputs.structure_overrides.get_dict().get(frame['key'], {}))
        parameters = recursive_merge(parameters, overrides.get('pw', {}).pop('parameters', {}))
        if frame['config_type'] == ISOLATED_ATOM:
            kpoints = orm.KpointsData()
            kpoints.set_kpoints_mesh([1, 1, 1])
            inputs.pop('kpoints_distance', None)
            inputs.kpoints = kpoints
            parameters.get('CONTROL', {}).pop('tstress', None)
        system = parameters.get('SYSTEM', {})
        if system.get('occupations') == 'smearing' and 'nbnd' not in system:
            electrons = sum(inputs.pw.pseudos[site.kind_name].z_valence for site in structure.sites)
            system['nbnd'] = bands_for_smearing(electrons)
        inputs.pw.parameters = orm.Dict(parameters)
        if 'max_iterations' in overrides:
            inputs.max_iterations = orm.Int(overrides['max_iterations'])
        if 'metadata' in overrides.get('pw', {}):
            options = dict(inputs.pw.metadata.get('options', {}))
            options.update(overrides['pw']['metadata'].get('options', {}))
            inputs.pw.metadata['options'] = options
        inputs.metadata = {'call_link_label': f'label_{frame["key"]}'}
        return inputs

    def frames_left(self) -> bool:
        return self.ctx.next_frame < len(self.ctx.frames)

    def run_labeling(self):
        """Fill the free slots (all frames at once without ``max_concurrent``) and wake up when the run launched last
        ends: it is the cheapest in flight, so a slot is refilled soon after any run ends (a work chain step can
        await all of its futures, not the first of them)."""
        cap = self.inputs.max_concurrent.value if 'max_concurrent' in self.inputs else len(self.ctx.frames)
        self.ctx.in_flight = [pk for pk in self.ctx.in_flight if not orm.load_node(pk).is_terminated]
        launched = None
        while len(self.ctx.in_flight) < cap and self.frames_left():
            index = self.ctx.launch_order[self.ctx.next_frame]
            self.ctx.next_frame += 1
            frame = self.ctx.frames[index]
            launched = self.submit(PwBaseWorkChain, **self._pw_base_inputs(frame))
            self.report(f'launched PwBaseWorkChain<{launched.pk}> for `{frame["key"]}`')
            self.ctx[frame_link_prefix(index)] = launched
            self.ctx.in_flight.append(launched.pk)
        if not self.frames_left():
            return None
        return ToContext(last_launched=launched or orm.load_node(self.ctx.in_flight[-1]))

    def await_labeling(self):
        """Wait for every run still in flight."""
        return ToContext(**{frame_link_prefix(index): self.ctx[frame_link_prefix(index)]
                            for index in range(len(self.ctx.frames))})

    def _frame_problem(self, node, outputs) -> tuple[str | None, list[str]]:
        """(reason to drop, warnings) for one finished PwBaseWorkChain, whose labels are ``outputs``."""
        if outputs is None:
            return f'PwBaseWorkChain<{node.pk}> failed with exit status {node.exit_status}: {node.exit_message}', []
        if 'output_parameters' not in outputs or 'output_trajectory' not in outputs:
            return f'PwBaseWorkChain<{node.pk}> returned no energy or trajectory', []
        energy = outputs.output_parameters.get('energy')
        if energy is None or not np.isfinite(energy):
            return f'non-finite or missing energy ({energy})', []
        trajectory = outputs.output_trajectory
        if 'forces' not in trajectory.get_arraynames():
            return 'no forces in the output (tprnfor off?)', []
        forces = trajectory.get_array('forces')[-1]
        largest = float(np.max(np.linalg.norm(forces, axis=1)))
        if not np.isfinite(largest):
            return 'non-finite forces', []
        if largest > self.inputs.max_force.value:
            return f'maximum force {largest:.2f} eV/Å above the threshold {self.inputs.max_force.value} eV/Å', []
        warnings = []
        net_force = float(np.linalg.norm(forces.sum(axis=0))) / len(forces)
        if net_force > NET_FORCE_WARNING:
            warnings.append(f'net force {net_force * 1000:.2f} meV/Å per atom signals numerical noise')
        return None, warnings

    def inspect_labeling(self):
        """Quality control: keep the frames that pass, record why the others were dropped."""
        self.ctx.accepted, dropped, warnings, failed_elements = [], {}, {}, []
        for index, frame in enumerate(self.ctx.frames):
            node = self.ctx[frame_link_prefix(index)]
            outputs, salvage_warnings = labeled_outputs(node)
            reason, frame_warnings = self._frame_problem(node, outputs)
            frame_warnings = salvage_warnings + frame_warnings
            if frame_warnings:
                warnings[frame['key']] = frame_warnings
            if reason is None:
                self.ctx.accepted.append((index, frame, outputs))
                continue
            dropped[frame['key']] = reason
            self.report(f'dropped `{frame["key"]}`: {reason}')
            if frame['config_type'] == ISOLATED_ATOM:
                failed_elements.append(frame['key'].removeprefix('isolated_'))
        n_frames = len(self.ctx.frames)
        self.ctx.failed_elements = failed_elements
        self.ctx.failure_fraction = len(dropped) / n_frames
        self.out('quality_report', orm.Dict({
            'n_frames': n_frames,
            'n_accepted': len(self.ctx.accepted),
            'accepted': [frame['key'] for _, frame, _ in self.ctx.accepted],
            'dropped': dropped,
            'warnings': warnings,
            'failure_fraction': self.ctx.failure_fraction,
            'max_failure_fraction': self.inputs.max_failure_fraction.value,
            'max_force': self.inputs.max_force.value,
        }).store())

    def _fingerprint(self) -> dict:
        """DFT settings every frame shares: what decides whether two datasets may be merged."""
        pw = self.inputs.pw_base.pw
        parameters = pw.parameters.get_dict()
        system = parameters.get('SYSTEM', {})
        family = self.ctx.family
        elements = sorted({e for _, frame, _ in self.ctx.accepted for e in elements_of([frame['structure']])})
        kpoints_distance = self.inputs.pw_base.get('kpoints_distance')
        return {
            'code': pw.code.full_label,
            'code_uuid': pw.code.uuid,
            'pseudo_family': family.label,
            'pseudos': {element: family.get_pseudo(element).md5 for element in elements},
            'functional': system.get('input_dft') or family.base.extras.get('functional', 'from pseudopotentials'),
            'ecutwfc': system.get('ecutwfc'),
            'ecutrho': system.get('ecutrho'),
            'kpoints_distance': kpoints_distance.value if kpoints_distance is not None else None,
            'kpoints_mesh': self.inputs.pw_base.kpoints.get_kpoints_mesh()[0] if 'kpoints' in self.inputs.pw_base
            else None,
            'occupations': system.get('occupations'),
            'smearing': system.get('smearing'),
            'degauss': system.get('degauss'),
            'nspin': system.get('nspin', 1),
        }

    def collect_dataset(self):
        """Make the dataset with a calcfunction whose inputs are the PwBaseWorkChain outputs (provenance)."""
        if not self.ctx.accepted:
            return self.exit_codes.ERROR_NO_FRAME_LABELED
        frames = {}
        for position, (_, frame, outputs) in enumerate(self.ctx.accepted):
            prefix = frame_link_prefix(position)
            frames[f'{prefix}_structure'] = frame['structure']
            frames[f'{prefix}_parameters'] = outputs.output_parameters
            frames[f'{prefix}_trajectory'] = outputs.output_trajectory
        settings = orm.Dict({
            'config_types': [frame['config_type'] for _, frame, _ in self.ctx.accepted],
            'fingerprint': self._fingerprint(),
        })
        self.out('dataset', collect_labeled_frames(settings, **frames, metadata={'call_link_label': 'collect'}))

    def results(self):
        """Fail (after attaching what was computed) when too many frames were dropped or an E0 is missing."""
        if self.ctx.failed_elements:
            return self.exit_codes.ERROR_ISOLATED_ATOM_FAILED.format(elements=', '.join(self.ctx.failed_elements))
        limit = self.inputs.max_failure_fraction.value
        if self.ctx.failure_fraction > limit:
            return self.exit_codes.ERROR_TOO_MANY_REJECTED_FRAMES.format(
                fraction=self.ctx.failure_fraction, limit=limit
            )
        self.report(f'labeled {len(self.ctx.accepted)} of {len(self.ctx.frames)} frames')
        return None

    def on_terminated(self):
        """Clean the remote folders of the pw.x runs if asked."""
        super().on_terminated()
        if not self.inputs.clean_workdir.value:
            return
        for called in self.node.called_descendants:
            if isinstance(called, orm.CalcJobNode):
                try:
                    called.outputs.remote_folder._clean()  # noqa: SLF001
                except (OSError, KeyError):
                    pass
