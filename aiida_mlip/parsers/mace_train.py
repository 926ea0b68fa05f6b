"""Parser of ``mlip.mace_train``: reads only the ``retrieved`` folder (never the remote work directory).

What mace-torch 0.3.16 writes, and what is read from it:

* ``logs/model_run-<seed>.log``: the mace version and the final error tables (``Error-table on TRAIN and VALID``
  and ``Error-table on TEST``, prettytable blocks, values in meV/atom, meV/Å, meV/Å³, %) -> ``metrics``;
* ``results/model_run-<seed>_train.txt``: one JSON object per line, ``mode`` ``opt`` (a training step's loss) or
  ``eval`` (validation loss and errors in eV units, ``epoch`` null before training) -> ``learning_curve``;
* ``model.model`` (``model_stagetwo.model`` with SWA) -> ``model``;
* ``checkpoints/*.pt`` -> kept in ``retrieved`` for restarts after a walltime stop;
* ``mace.err``: the Python traceback when mace stopped with an exception.
"""
from __future__ import annotations

import json
import math
import re
import tempfile

import numpy as np
from aiida import orm
from aiida.parsers import Parser

from aiida_mlip.calculations.mace_train import NAME, STDERR

#: Column headers of mace's error tables -> metric keys (values keep mace's units, see UNITS).
COLUMN_KEYS = {
    'RMSE E / meV / atom': 'rmse_e_per_atom',
    'MAE E / meV / atom': 'mae_e_per_atom',
    'RMSE E / meV': 'rmse_e',
    'MAE E / meV': 'mae_e',
    'RMSE F / meV / A': 'rmse_f',
    'MAE F / meV / A': 'mae_f',
    'relative F RMSE %': 'rel_rmse_f',
    'relative F MAE %': 'rel_mae_f',
    'rel F RMSE %': 'rel_rmse_f',
    'RMSE Stress (Virials) / meV / A (A^3)': 'rmse_stress',
    'MAE Stress (Virials) / meV / A (A^3)': 'mae_stress',
}
UNITS = {
    'rmse_e_per_atom': 'meV/atom', 'mae_e_per_atom': 'meV/atom', 'rmse_e': 'meV', 'mae_e': 'meV',
    'rmse_f': 'meV/Å', 'mae_f': 'meV/Å', 'rel_rmse_f': '%', 'rel_mae_f': '%',
    'rmse_stress': 'meV/Å³', 'mae_stress': 'meV/Å³', 'loss': 'dimensionless (mace loss)',
}
#: Validation metrics of results/*_train.txt (eV units there) stored in the learning curve and metrics, in meV.
EVAL_KEYS = ('rmse_e_per_atom', 'mae_e_per_atom', 'rmse_f', 'mae_f', 'rmse_stress', 'mae_stress')

_TABLE_TITLES = {'Error-table on TRAIN and VALID:': 'train_valid', 'Error-table on TEST:': 'test'}


def _slug(header: str) -> str:
    return COLUMN_KEYS.get(header, re.sub(r'[^a-z0-9]+', '_', header.lower()).strip('_'))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse_error_tables(log: str) -> dict:
    """``{'train_valid': {row: {key: value}}, 'test': {...}}`` from the last error tables of a mace log."""
    tables = {}
    lines = log.splitlines()
    index = 0
    while index < len(lines):
        title = next((kind for marker, kind in _TABLE_TITLES.items() if lines[index].rstrip().endswith(marker)), None)
        index += 1
        if title is None:
            continue
        block = []
        while index < len(lines) and lines[index][:1] in ('+', '|'):
            block.append(lines[index])
            index += 1
        rows = [[cell.strip() for cell in line.strip().strip('|').split('|')] for line in block if line.startswith('|')]
        if len(rows) < 1:
            continue
        header, body = rows[0], rows[1:]
        keys = [_slug(cell) for cell in header[1:]]
        tables[title] = {row[0]: {key: _number(value) for key, value in zip(keys, row[1:])} for row in body}
    return tables


def parse_results(text: str) -> list[dict]:
    """The JSON lines of ``results/*_train.txt`` (NaN/Infinity are valid there)."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed job
    return records


def _finite(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


def first_divergence(records: list[dict], log: str = '') -> int | None:
    """Epoch of the first non-finite loss or error (-1: before training), or None."""
    for record in records:
        values = [record.get('loss')] + [record.get(key) for key in EVAL_KEYS]
        if not all(_finite(value) for value in values):
            return -1 if record.get('epoch') is None else int(record['epoch'])
    match = re.search(r'(Initial|Epoch (\d+)): head: \S+, loss=\s*(nan|inf|-inf)\b', log)
    if match:
        return int(match.group(2)) if match.group(2) else -1
    return None


def main_head(records: list[dict]) -> str | None:
    heads = [record.get('head') for record in records if record.get('mode') == 'eval']
    if 'Default' in heads:
        return 'Default'
    return next((head for head in heads if head != 'pt_head'), heads[0] if heads else None)


def learning_curve(records: list[dict]) -> dict[str, np.ndarray]:
    """Per evaluation of the main head: epoch (-1 = before training), mean training loss of that epoch,
    validation loss and validation errors in meV units."""
    head = main_head(records)
    evals = [r for r in records if r.get('mode') == 'eval' and r.get('head') == head]
    opt_losses = {}
    for record in records:
        if record.get('mode') == 'opt' and record.get('epoch') is not None:
            opt_losses.setdefault(int(record['epoch']), []).append(record.get('loss', math.nan))
    epochs = [(-1 if r.get('epoch') is None else int(r['epoch'])) for r in evals]
    arrays = {
        'epoch': np.array(epochs, dtype=int),
        'train_loss': np.array([float(np.mean(opt_losses[e])) if e in opt_losses else math.nan for e in epochs]),
        'valid_loss': np.array([float(r.get('loss', math.nan)) for r in evals]),
    }
    for key in EVAL_KEYS:
        values = [r.get(key) for r in evals]
        if any(value is not None for value in values):
            arrays[f'valid_{key}'] = np.array([1e3 * v if v is not None else math.nan for v in values], dtype=float)
    return arrays


def best_epoch_metrics(records: list[dict]) -> dict:
    """Validation errors (meV units) at the epoch of lowest validation loss: the checkpoint mace keeps."""
    head = main_head(records)
    evals = [r for r in records if r.get('mode') == 'eval' and r.get('head') == head and r.get('epoch') is not None]
    if not evals:
        return {}
    best = min(evals, key=lambda r: r.get('loss', math.inf))
    result = {'best_epoch': int(best['epoch']), 'epochs_completed': max(int(r['epoch']) for r in evals) + 1,
              'valid_loss_at_best_epoch': float(best['loss'])}
    result['valid_at_best_epoch'] = {key: 1e3 * best[key] for key in EVAL_KEYS if best.get(key) is not None}
    return result


def _json_safe(value):
    """NaN/inf -> None, recursively: the database stores JSON, which has no NaN."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mace_exception(stderr: str) -> str | None:
    """The last line of a Python traceback in mace's stderr, or None."""
    if 'Traceback (most recent call last)' not in stderr:
        return None
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(' ')]
    return lines[-1].strip() if lines else 'unknown exception'


class MaceTrainParser(Parser):
    """Turns a finished ``mace_run_train`` job into ``model``, ``metrics`` and ``learning_curve``."""

    def parse(self, **kwargs):
        try:
            retrieved = self.retrieved
            names = set(self._walk(retrieved))
        except Exception:  # noqa: BLE001  (missing or unreadable retrieved folder)
            return self.exit_codes.ERROR_RETRIEVED_FOLDER_UNREADABLE

        def read(name):
            return retrieved.base.repository.get_object_content(name, mode='r')

        logs = sorted(n for n in names if re.fullmatch(r'logs/.+_run-[^/]*\.log', n) and not n.endswith('_debug.log'))
        results = sorted(n for n in names if re.fullmatch(r'results/.+_train\.txt', n))
        checkpoints = sorted(n for n in names if n.startswith('checkpoints/') and n.endswith('.pt'))
        log = read(logs[-1]) if logs else ''
        records = parse_results(read(results[-1])) if results else []
        stderr = read(STDERR) if STDERR in names else ''

        if records:
            arrays = learning_curve(records)
            if len(arrays['epoch']):
                curve = orm.ArrayData()
                for key, value in arrays.items():
                    curve.set_array(key, value)
                curve.base.attributes.set('units', {
                    'epoch': '-1 = before training', 'train_loss': UNITS['loss'], 'valid_loss': UNITS['loss'],
                    **{f'valid_{key}': UNITS[key] for key in EVAL_KEYS},
                })
                self.out('learning_curve', curve)

        walltime = self.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME.status
        if self.node.exit_status == walltime:
            epochs = [r['epoch'] for r in records if r.get('mode') == 'eval' and r.get('epoch') is not None]
            return self.exit_codes.ERROR_OUT_OF_WALLTIME.format(
                epoch=max(epochs) if epochs else 'none', checkpoints=len(checkpoints))

        if not logs:
            exception = mace_exception(stderr)
            if exception:
                return self.exit_codes.ERROR_MACE_EXCEPTION.format(exception=exception)
            return self.exit_codes.ERROR_OUTPUT_LOG_MISSING

        diverged = first_divergence(records, log)
        metrics = self._metrics(log, records)
        if metrics:
            self.out('metrics', orm.Dict(_json_safe(metrics)))
        if diverged is not None:
            return self.exit_codes.ERROR_NAN_LOSS.format(epoch=diverged)

        filename = f'{NAME}_stagetwo.model' if f'{NAME}_stagetwo.model' in names else f'{NAME}.model'
        if filename not in names:
            exception = mace_exception(stderr)
            if exception:
                return self.exit_codes.ERROR_MACE_EXCEPTION.format(exception=exception)
            return self.exit_codes.ERROR_NO_MODEL_WRITTEN.format(filename=filename)
        try:
            self.out('model', self._model(retrieved, filename, metrics.get('mace_version')))
        except ValueError as exception:
            return self.exit_codes.ERROR_MODEL_UNREADABLE.format(exception=exception)
        return None

    @staticmethod
    def _walk(folder: orm.FolderData, directory: str = '') -> list[str]:
        repository = folder.base.repository
        names = []
        for name in repository.list_object_names(directory or None):
            path = f'{directory}/{name}' if directory else name
            if repository.get_object(path).file_type.name == 'DIRECTORY':
                names += MaceTrainParser._walk(folder, path)
            else:
                names.append(path)
        return names

    @staticmethod
    def _metrics(log: str, records: list[dict]) -> dict:
        tables = parse_error_tables(log)
        metrics = {}
        version = re.search(r'MACE version: (\S+)', log)
        if version:
            metrics['mace_version'] = version.group(1)
        rows = {**tables.get('train_valid', {}), **tables.get('test', {})}
        if rows:
            metrics['tables'] = rows
            train = [name for name in tables.get('train_valid', {}) if name.startswith('train_')]
            valid = [name for name in tables.get('train_valid', {}) if name.startswith('valid_')]
            test = [name for name in tables.get('test', {}) if name.startswith('test_')] or list(tables.get('test', {}))
            for split, names in (('train', train), ('valid', valid), ('test', test)):
                preferred = [n for n in names if n.endswith('_Default')] or names
                if preferred:
                    metrics[split] = rows[preferred[0]]
        metrics.update(best_epoch_metrics(records))
        if metrics:
            metrics['units'] = UNITS
        return metrics

    def _model(self, retrieved, filename: str, mace_version: str | None):
        from aiida_mlip.data.model import MlipModel

        with tempfile.TemporaryDirectory(prefix='aiida-mlip-parse-') as directory:
            path = f'{directory}/{filename}'
            with retrieved.base.repository.open(filename, 'rb') as source, open(path, 'wb') as target:
                target.write(source.read())
            return MlipModel.from_file(path, origin='trained', source=filename, mace_version=mace_version)
