"""HTML report of a workflow node: what it and its called descendants computed, with PNG figures and provenance.

:func:`write_report` finds what it can show by process type and output names, so one function serves
``mlip.training``, ``mlip.validation``, ``mlip.finetune``, ``mlip.active_learning``, ``mlip.transferability`` and
``mlip.campaign`` nodes (and any workflow that calls them). A section whose data are absent is left out. The page is
self-contained: plain HTML with escaped text, figures as PNG files next to ``index.html``, no script and no external
URL, and every number names the pk of the node it comes from (``verdi node show PK``).
"""
from __future__ import annotations

import html
import pathlib
import re
import time

import numpy as np
from aiida import orm
from aiida.common.links import LinkType

from aiida_mlip.query import PW_PROCESS_TYPE as PW
from aiida_mlip.report import figures

#: Marks a page written by :func:`write_report` (the CLI may overwrite such a folder).
GENERATOR = 'aiida-mlip report'
EVALUATE = 'aiida.calculations:mlip.evaluate'
MACE_TRAIN = 'aiida.calculations:mlip.mace_train'
TRAINING = 'aiida.workflows:mlip.training'
VALIDATION = 'aiida.workflows:mlip.validation'
TRANSFERABILITY = 'aiida.workflows:mlip.transferability'
REFINEMENT = 'aiida.workflows:mlip.refinement'
#: Transferability matrix entries shown as tables (rows = models, columns = classes).
MATRIX_KEYS = {
    'energy_mae_mev_per_atom': 'energy MAE (meV/atom)',
    'energy_rmse_mev_per_atom': 'energy RMSE (meV/atom)',
    'forces_mae_mev_per_a': 'forces MAE (meV/Å)',
    'forces_rmse_mev_per_a': 'forces RMSE (meV/Å)',
    'committee_force_std_mev_per_a': 'committee force std (meV/Å)',
}
#: prediction_metrics entries of the test-error table: (key, label).
TEST_METRICS = (
    ('energy_per_atom_mev', 'energy (meV/atom)'),
    ('forces_mev_per_a', 'forces (meV/Å)'),
    ('stress_mev_per_a3', 'stress (meV/Å³)'),
)
#: Fingerprint entries shown in the provenance summary.
FINGERPRINT_KEYS = ('pseudo_family', 'functional', 'ecutwfc', 'ecutrho', 'kpoints_distance', 'kpoints_mesh',
                    'occupations', 'smearing', 'degauss', 'nspin', 'code')
#: Longest list shown in full in a table cell.
MAX_LIST = 12

STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 1em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-family: monospace; }
figure { display: inline-block; vertical-align: top; width: min-content; margin: 0.5em; }
figcaption { font-size: 0.8em; color: #555; }
.passed { color: #060; font-weight: bold; } .failed { color: #a00; font-weight: bold; }
code { font-size: 0.9em; }
"""


def escape(value) -> str:
    """Text for HTML (``&<>"'`` escaped): every value from the database goes through here."""
    return html.escape(str(value), quote=True)


def format_value(value) -> str:
    """A short plain-text rendering of a number, flag, list, mapping or text (not escaped)."""
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, (float, np.floating)):
        return f'{value:.4g}'
    if isinstance(value, dict):
        return ', '.join(f'{key}: {format_value(item)}' for key, item in value.items())
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST or any(isinstance(item, (list, tuple, dict)) for item in value):
            return f'[{len(value)} values]'
        return '[' + ', '.join(format_value(item) for item in value) + ']'
    return str(value)


def flatten(mapping: dict, prefix: str = '') -> dict:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``: nested result dicts as rows of a table."""
    rows = {}
    for key, value in mapping.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict) and value:
            rows.update(flatten(value, f'{name}.'))
        else:
            rows[name] = value
    return rows


def table(header, rows) -> str:
    """An HTML table; cells are escaped, numbers right-aligned. ``header`` may be None."""
    parts = ['<table>']
    if header:
        parts.append('<tr>' + ''.join(f'<th>{escape(cell)}</th>' for cell in header) + '</tr>')
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float, np.number)) and not isinstance(cell, bool)
            cells.append(f'<td class="num">{escape(format_value(cell))}</td>' if numeric
                         else f'<td>{escape(format_value(cell))}</td>')
        parts.append('<tr>' + ''.join(cells) + '</tr>')
    parts.append('</table>')
    return '\n'.join(parts)


def node_ref(node) -> str:
    """``Label<pk>`` of a node, as verdi prints it."""
    label = getattr(node, 'process_label', None) or node.__class__.__name__
    return f'{label}<{node.pk}>'


def _link_label(label: str) -> str:
    return label.replace('__', '.')


class Report:
    """Collects sections (HTML fragments) and PNG files for one node."""

    def __init__(self, node: orm.ProcessNode):
        self.node = node
        self.sections: list[tuple[str, str, str]] = []  # (anchor, title, body html)
        self.files: dict[str, bytes] = {}  # PNG file name -> content
        self.shown: dict[int, orm.Node] = {node.pk: node}
        self.descendants = sorted(node.called_descendants, key=lambda n: n.pk) \
            if isinstance(node, orm.WorkflowNode) else []
        self.processes = [node, *self.descendants]

    # ---- helpers ----------------------------------------------------------------------------------------------
    def call_path(self, process) -> str:
        """Call link labels from the report's node down to ``process`` (e.g. ``validate_zero_shot/eos_dft``)."""
        labels = []
        while process is not None and process.pk != self.node.pk:
            links = process.base.links.get_incoming(link_type=(LinkType.CALL_WORK, LinkType.CALL_CALC)).all()
            if not links:
                break
            labels.append(links[0].link_label)
            process = links[0].node
        return '/'.join(reversed(labels)) or 'this node'

    def of_type(self, process_type: str) -> list:
        return [process for process in self.processes if process.process_type == process_type]

    def mark(self, *nodes) -> str:
        """Remember nodes as shown (they go into the provenance table); returns their ``Label<pk>`` list."""
        for node in nodes:
            self.shown[node.pk] = node
        return ', '.join(node_ref(node) for node in nodes)

    def figure(self, content: bytes, name: str, caption: str) -> str:
        """Keep a PNG for the folder of index.html; returns its ``<figure>`` (caption escaped)."""
        filename = f'{len(self.files) + 1:02d}_{re.sub(r"[^A-Za-z0-9_.-]+", "_", name)}.png'
        self.files[filename] = content
        return (f'<figure><img src="{escape(filename)}" alt="{escape(caption)}">'
                f'<figcaption>{escape(caption)}</figcaption></figure>')

    def copy_figure(self, node: orm.SinglefileData, name: str, caption: str) -> str:
        with node.open(mode='rb') as handle:
            content = handle.read()
        self.mark(node)
        return self.figure(content, name, f'{caption} ({node_ref(node)})')

    def add(self, title: str, body: str):
        if body:
            anchor = re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')
            self.sections.append((anchor, title, body))

    # ---- sections ---------------------------------------------------------------------------------------------
    def overview(self):
        node = self.node
        rows = [('process', node_ref(node)), ('uuid', node.uuid), ('state', node.process_state.value
                                                                      if node.process_state else None),
                ('exit status', node.exit_status), ('exit message', node.exit_message),
                ('created', node.ctime.isoformat(timespec='seconds')), ('label', node.label or None),
                ('description', node.description or None), ('called processes', len(self.descendants))]
        self.add('Overview', table(None, [row for row in rows if row[1] not in (None, '')]))

    def summaries(self):
        """The node's own result Dicts: ``summary`` (active learning, campaign) and ``comparison`` (fine-tuning)."""
        parts = []
        for name in ('summary', 'comparison'):
            if name in self.node.outputs and isinstance(self.node.outputs[name], orm.Dict) \
                    and self.node.process_type != VALIDATION:
                output = self.node.outputs[name]
                parts.append(f'<h3>{escape(name)} ({escape(self.mark(output))})</h3>')
                parts.append(table(('quantity', 'value'), flatten(output.get_dict()).items()))
        iterations = self.node.outputs['iterations'] if 'iterations' in self.node.outputs else {}
        if iterations:
            keys = sorted(iterations)
            records = {key: flatten(iterations[key].get_dict()) for key in keys}
            names = list(dict.fromkeys(name for key in keys for name in records[key]))
            self.mark(*(iterations[key] for key in keys))
            parts.append(f'<h3>iterations ({escape(", ".join(node_ref(iterations[k]) for k in keys))})</h3>')
            parts.append(table(('quantity', *keys), [(name, *(records[key].get(name) for key in keys))
                                                     for name in names]))
        self.add('Summary', '\n'.join(parts))

    def test_errors(self):
        rows = []
        for process in self.of_type(TRAINING):
            if 'test_metrics' not in process.outputs:
                continue
            output = process.outputs.test_metrics
            metrics = output.get_dict()
            row = [self.call_path(process), self.mark(output), metrics.get('n_frames')]
            for key, _ in TEST_METRICS:
                row += [metrics.get(key, {}).get('mae'), metrics.get(key, {}).get('rmse')]
            row.append(metrics.get('committee', {}).get('spearman_deviation_vs_error'))
            rows.append(row)
        header = ['training', 'node', 'test frames']
        for _, label in TEST_METRICS:
            header += [f'{label} MAE', f'{label} RMSE']
        header.append('Spearman(committee std, error)')
        self.add('Test-set errors', table(header, rows) if rows else '')

    def parity(self):
        """Model vs DFT on every labeled dataset an ``mlip.evaluate`` job scored, per model group (committee mean)."""
        parts = []
        for calc in self.of_type(EVALUATE):
            if 'dataset' not in calc.inputs or not {'energies', 'forces', 'summary'} <= set(calc.outputs):
                continue
            dataset = calc.inputs.dataset
            arrays = dataset.get_arrays()
            n_atoms = arrays['n_atoms']
            energies = calc.outputs.energies.get_array('energies')
            forces = calc.outputs.forces.get_array('forces')
            keys = calc.outputs.summary.get('model_keys') or [f'model_{i}' for i in range(len(energies))]
            mask = np.all(np.isfinite(arrays['forces']), axis=1)  # atoms with force labels
            where = f'{self.call_path(calc)}: {node_ref(calc)} on {dataset.n_frames} frames of {node_ref(dataset)}'
            self.mark(calc, dataset)
            parts.append(f'<h3>{escape(where)}</h3>')
            for group, rows in model_groups(keys).items():
                name = f'{self.call_path(calc)}_{group}'
                label = f'{group} ({len(rows)} models, mean)' if len(rows) > 1 else group
                energy = energies[rows].mean(axis=0) / n_atoms
                force = forces[rows].mean(axis=0)
                parts.append(self.figure(figures.parity(arrays['energy'] / n_atoms, energy, 'energy', 'eV/atom'),
                                         f'{name}_energy_parity', f'{label}: energy per atom, {where}'))
                if mask.any():
                    parts.append(self.figure(figures.parity(arrays['forces'][mask], force[mask], 'forces', 'eV/Å'),
                                             f'{name}_forces_parity', f'{label}: force components, {where}'))
                    parts.append(self.figure(
                        figures.error_histogram(1e3 * arrays['forces'][mask], 1e3 * force[mask], 'forces', 'meV/Å'),
                        f'{name}_forces_errors', f'{label}: force component errors, {where}'))
        self.add('Parity plots and error histograms', '\n'.join(parts))

    def learning_curves(self):
        """One figure per caller of ``mlip.mace_train`` jobs (a committee's members together)."""
        groups = {}
        for calc in self.of_type(MACE_TRAIN):
            if 'learning_curve' not in calc.outputs:
                continue
            path = self.call_path(calc).split('/')
            training = '/'.join(path[:-2]) if len(path) > 2 else 'this node'
            member = path[-2] if len(path) > 1 else path[-1]
            curve = calc.outputs.learning_curve
            groups.setdefault(training, {})[f'{member} ({calc.pk})'] = (
                calc, {name: curve.get_array(name) for name in curve.get_arraynames()})
        parts = []
        for training, curves in groups.items():
            refs = self.mark(*(calc for calc, _ in curves.values()))
            parts.append(self.figure(figures.learning_curve({label: arrays for label, (_, arrays) in curves.items()}),
                                     f'{training}_learning_curve', f'{training}: {refs}'))
        self.add('Learning curves', '\n'.join(parts))

    def validations(self):
        parts = []
        for process in self.of_type(VALIDATION):
            if 'comparison' not in process.outputs:
                continue
            comparison = process.outputs.comparison.get_dict()
            verdict = comparison.pop('verdict', {})
            passed = verdict.get('passed')
            status = {True: ('passed', 'PASSED'), False: ('failed', 'FAILED')}.get(passed, ('', 'no verdict'))
            parts.append(f'<h3>{escape(self.call_path(process))}: {escape(self.mark(process))} '
                         f'<span class="{status[0]}">{status[1]}</span></h3>')
            if verdict.get('failed'):
                parts.append('<ul>' + ''.join(f'<li>{escape(reason)}</li>' for reason in verdict['failed']) + '</ul>')
            rows = [(name, value, verdict.get('checks', {}).get(name)) for name, value in flatten(comparison).items()]
            parts.append(table(('quantity', 'value', 'check passed'), rows))
            parts.append(self.elastic_table(process))
            for name, node in sorted((process.outputs['figures'] if 'figures' in process.outputs else {}).items()):
                parts.append(self.copy_figure(node, f'{self.call_path(process)}_{name}',
                                              f'{name.replace("_", " ")}, {self.call_path(process)}'))
        self.add('Validation against DFT', '\n'.join(parts))

    def refinement(self):
        """Per refinement (this node or a called one): each validation error against the DFT labels used."""
        parts = []
        for process in self.of_type(REFINEMENT):
            if 'summary' not in process.outputs:
                continue
            summary = process.outputs.summary
            record = summary.get_dict()
            verdict = 'PASSED' if record.get('passed') else 'FAILED'
            parts.append(f'<h3>{escape(self.call_path(process))}: {escape(self.mark(process, summary))} '
                         f'<span class="{verdict.lower()}">{verdict}</span></h3>')
            parts.append(f'<p>{escape(record.get("stop_reason"))}; DFT labels per iteration: '
                         f'{escape(record.get("dft_labels"))}</p>')
            for label, errors in (record.get('errors_vs_labels') or {}).items():
                parts.append(self.figure(figures.refinement_errors(record['dft_labels'], errors),
                                         f'{self.call_path(process)}_{label}_refinement',
                                         f'{label}: validation errors against DFT labels, {node_ref(summary)}'))
        self.add('Refinement', '\n'.join(parts))

    def elastic_table(self, process) -> str:
        """Cij (GPa) of both engines side by side, ``DFT / MLIP`` per entry."""
        tensors = {}
        for engine in ('dft', 'mlip'):
            outputs = process.outputs[engine] if engine in process.outputs else {}
            if 'elastic' in outputs:
                tensors[engine] = np.array(outputs['elastic'].get_dict()['elastic_tensor_gpa'])
                self.mark(outputs['elastic'])
        if len(tensors) < 2:
            return ''
        rows = [[f'C{i + 1}j'] + [f'{tensors["dft"][i, j]:.1f} / {tensors["mlip"][i, j]:.1f}' for j in range(6)]
                for i in range(6)]
        return '<p>Elastic constants Cij (GPa), DFT / MLIP:</p>' + table([''] + [f'j={j + 1}' for j in range(6)], rows)

    def transferability(self):
        parts = []
        for process in self.of_type(TRANSFERABILITY):
            if 'matrix' not in process.outputs:
                continue
            output = process.outputs.matrix
            matrix = output.get_dict()
            models, classes = matrix.get('models', []), matrix.get('classes', [])
            parts.append(f'<h3>{escape(self.call_path(process))}: {escape(self.mark(process, output))}</h3>')
            heatmaps = process.outputs['figures'] if 'figures' in process.outputs else {}  # figures.heatmap PNGs
            for name, node in sorted(heatmaps.items()):
                parts.append(self.copy_figure(node, f'{self.call_path(process)}_{name}', name.replace('_', ' ')))
            for key, label in MATRIX_KEYS.items():
                values = matrix.get(key)
                if values is None:
                    continue
                parts.append(f'<p>{escape(label)}: rows = models, columns = test classes</p>')
                parts.append(table(['model', *classes], [[model, *row] for model, row in zip(models, values)]))
            extra = {key: value for key, value in matrix.items() if key not in MATRIX_KEYS and key not in
                     ('models', 'classes')}
            if extra:
                parts.append(table(('quantity', 'value'), flatten(extra).items()))
        self.add('Transferability', '\n'.join(parts))

    def provenance(self):
        """Datasets (DFT settings, pw.x runs behind them), models (sha256) and every node shown, by pk and uuid."""
        models = self.models()
        datasets = self.datasets(models)
        parts = []
        start = [node.pk for node in [*datasets.values(), *models.values()]]
        behind = pw_ancestors(start)
        called = [p for p in self.descendants if p.process_type == PW]
        sources = {uuid for dataset in datasets.values() for uuid in dataset.source_uuids if uuid}
        labeling = orm.QueryBuilder().append(orm.CalcJobNode, filters={'uuid': {'in': sorted(sources)},
                                                                       'process_type': PW}).count() if sources else 0
        parts.append(table(None, [
            ('pw.x runs behind the datasets and models shown (ancestors in the provenance graph)', len(behind)),
            ('pw.x runs that labeled the frames of the datasets shown (their source_uuids)', labeling),
            ('pw.x runs called by this workflow (labeling and DFT references)', len(called)),
        ]))
        fingerprints = {}
        for dataset in datasets.values():
            digest = dataset.base.attributes.get('fingerprint_hash', None)
            fingerprints.setdefault(digest, (dataset.fingerprint or {}, []))[1].append(dataset)
        for digest, (fingerprint, members) in fingerprints.items():
            rows = [('fingerprint hash', digest), ('datasets', ', '.join(node_ref(d) for d in members))]
            rows += [(key, fingerprint.get(key)) for key in FINGERPRINT_KEYS if fingerprint.get(key) is not None]
            rows += [(f'pseudopotential {element} (md5)', md5)
                     for element, md5 in sorted((fingerprint.get('pseudos') or {}).items())]
            parts.append('<h3>DFT settings</h3>' + table(('setting', 'value'), rows))
        if datasets:
            parts.append('<h3>Datasets</h3>' + table(
                ('role', 'node', 'uuid', 'frames', 'elements', 'config types', 'labeling calculations'),
                [(role, node_ref(d), d.uuid, d.n_frames, ', '.join(d.elements),
                  d.config_types, len({u for u in d.source_uuids if u}))
                 for role, d in datasets.items()]))
        if models:
            parts.append('<h3>Models</h3>' + table(
                ('role', 'node', 'uuid', 'sha256', 'origin', 'elements', 'created by'),
                [(role, node_ref(m), m.uuid, m.sha256, m.origin, ', '.join(m.elements),
                  node_ref(m.creator) if m.creator else '-') for role, m in models.items()]))
        self.mark(*datasets.values(), *models.values())
        parts.append('<h3>Nodes shown in this report</h3><p>Inspect any of them with '
                     '<code>verdi node show PK</code>.</p>' + table(
                         ('pk', 'uuid', 'type'), [(pk, node.uuid, node_ref(node)) for pk, node in
                                                  sorted(self.shown.items())]))
        self.add('Provenance', '\n'.join(parts))

    def models(self) -> dict:
        """``mlip.model`` inputs and outputs of the node, by link label."""
        from aiida_mlip.data.model import MlipModel

        found = {}
        for direction in ('incoming', 'outgoing'):
            links = getattr(self.node.base.links, f'get_{direction}')(node_class=MlipModel).all()
            for link in links:
                found.setdefault(link.node.uuid, (f'{"input" if direction == "incoming" else "output"} '
                                                  f'{_link_label(link.link_label)}', link.node))
        return dict(found.values())

    def datasets(self, models: dict) -> dict:
        """``mlip.dataset`` inputs and outputs of the node, and the training sets of its models."""
        from aiida_mlip.data.dataset import TrainingSet

        found = {}
        for direction in ('incoming', 'outgoing'):
            for link in getattr(self.node.base.links, f'get_{direction}')(node_class=TrainingSet).all():
                found.setdefault(link.node.uuid, (f'{"input" if direction == "incoming" else "output"} '
                                                  f'{_link_label(link.link_label)}', link.node))
        for role, model in models.items():
            creator = model.creator
            if creator is not None and creator.process_type == MACE_TRAIN and 'train' in creator.inputs:
                found.setdefault(creator.inputs.train.uuid, (f'training set of {role}', creator.inputs.train))
        return dict(found.values())

    # ---- page -------------------------------------------------------------------------------------------------
    def html(self, seconds: float) -> str:
        title = f'{node_ref(self.node)}: aiida-mlip report'
        toc = ''.join(f'<li><a href="#{anchor}">{escape(name)}</a></li>' for anchor, name, _ in self.sections)
        body = '\n'.join(f'<section id="{anchor}"><h2>{escape(name)}</h2>\n{content}\n</section>'
                         for anchor, name, content in self.sections)
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f'<meta name="generator" content="{GENERATOR}">\n<title>{escape(title)}</title>\n'
                f'<style>{STYLE}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>\n'
                f'<p>Written {escape(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} in {seconds:.1f} s from profile '
                f'<code>{escape(_profile_name())}</code>.</p>\n<ul>{toc}</ul>\n{body}\n</body>\n</html>\n')


def model_groups(keys: list[str]) -> dict[str, list[int]]:
    """Row indices per model group of an evaluation's sorted model keys: ``finetuned_member_0`` -> ``finetuned``;
    a plain committee (``member_0``, ``member_1``) is one group, ``committee``."""
    groups = {}
    for index, key in enumerate(keys):
        group = re.sub(r'_?member_\d+$', '', key) or ('committee' if len(keys) > 1 else 'model')
        groups.setdefault(group, []).append(index)
    return groups


def pw_ancestors(pks: list[int]) -> set[str]:
    """UUIDs of the PwCalculations in the provenance of the given nodes."""
    if not pks:
        return set()
    query = orm.QueryBuilder().append(orm.Node, filters={'id': {'in': pks}}, tag='start')
    query.append(orm.CalcJobNode, with_descendants='start', filters={'process_type': PW}, project='uuid')
    return set(query.all(flat=True))


def _profile_name() -> str:
    from aiida.manage import get_manager

    profile = get_manager().get_profile()
    return profile.name if profile else '-'


def previous_report_files(directory: pathlib.Path) -> list[pathlib.Path] | None:
    """Files of a report written here before (index.html and its PNGs), or None when ``index.html`` is not ours."""
    index = directory / 'index.html'
    if not index.is_file():
        return None
    text = index.read_text(encoding='utf-8', errors='replace')
    if f'<meta name="generator" content="{GENERATOR}">' not in text:
        return None
    names = set(re.findall(r'<img src="([^"/\\]+\.png)"', text))
    return [index] + [directory / name for name in sorted(names) if (directory / name).is_file()]


def write_report(node: orm.ProcessNode, directory) -> pathlib.Path:
    """Write ``index.html`` and its PNG figures for ``node`` into ``directory``; returns the path of index.html.

    Files of a previous report in ``directory`` are replaced; other files are left alone.
    :raises ValueError: if ``node`` is not a process, or nothing of it can be shown.
    """
    if not isinstance(node, orm.ProcessNode):
        raise ValueError(f'{node_ref(node)} is not a process node: give the pk of a workflow')
    start = time.perf_counter()
    report = Report(node)
    report.overview()
    for section in (report.summaries, report.refinement, report.test_errors, report.parity, report.learning_curves,
                    report.validations, report.transferability):
        section()
    if len(report.sections) == 1:
        raise ValueError(f'{node_ref(node)} has nothing to report: no test metrics, evaluations, learning curves, '
                         'validations, transferability matrix or summary among it and its called processes')
    report.provenance()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for path in previous_report_files(directory) or []:
        path.unlink()
    for filename, content in report.files.items():
        (directory / filename).write_bytes(content)
    index = directory / 'index.html'
    index.write_text(report.html(time.perf_counter() - start), encoding='utf-8')
    return index
