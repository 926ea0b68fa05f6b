"""Shared part of the parsers of engine jobs (``mlip.evaluate``, ``mlip.md``): reads only the ``retrieved`` folder.

An engine job (:class:`aiida_mlip.calculations.engine_job.EngineCalcJob`) leaves the engine's stderr, its exit status
(``engine.exit_code``, written by the job script right after the run line), a results npz, a JSON summary and a JSON
file with the keys of the job. :class:`EngineJobParser` turns an engine failure into the calculation's exit code
(engine exit status first, else the engine's last ``ERROR:`` line), reports missing output files, loads the npz and
the JSON files (corrupt files: 310), and the subclass checks them (inconsistent: 310) and attaches the outputs.
"""
from __future__ import annotations

import io
import json

import numpy as np
from aiida.common import exceptions
from aiida.parsers import Parser

from aiida_mlip.calculations.engine_job import EXIT_CODE_FILENAME, STDERR_FILENAME
from aiida_mlip.engine.evaluate import EXIT_BAD_MODEL, EXIT_BAD_STRUCTURES, EXIT_MISSING_ELEMENT, EXIT_OK

#: engine exit status -> exit code label of the calculation (any other non-zero status: ERROR_ENGINE_FAILED)
ENGINE_EXIT_CODES = {
    EXIT_MISSING_ELEMENT: 'ERROR_MISSING_ELEMENT',
    EXIT_BAD_MODEL: 'ERROR_UNREADABLE_MODEL',
    EXIT_BAD_STRUCTURES: 'ERROR_UNREADABLE_STRUCTURES',
}
#: Fallback when the exit status file is absent (a user append_text): classify the engine's ``ERROR:`` line.
ERROR_PATTERNS = (
    ('elements not supported', 'ERROR_MISSING_ELEMENT'),
    ('cannot read structures', 'ERROR_UNREADABLE_STRUCTURES'),
    ('cannot read model', 'ERROR_UNREADABLE_MODEL'),
    ('does not contain a mace model', 'ERROR_UNREADABLE_MODEL'),
    ('no model files', 'ERROR_UNREADABLE_MODEL'),
)


class EngineJobParser(Parser):
    """Engine failures to exit codes 300-304, corrupt output to 310; the outputs themselves to the subclass.

    Subclasses name their calculation (``CALCULATION``: its ``RESULTS_FILENAME``, ``SUMMARY_FILENAME`` and
    ``KEYS_FILENAME`` are read) and implement :meth:`check_outputs` and :meth:`store_outputs`.
    """

    #: the EngineCalcJob subclass whose files this parser reads
    CALCULATION: type

    def parse(self, **kwargs):
        try:
            retrieved = self.retrieved
        except exceptions.NotExistent:
            return self.exit_codes.ERROR_NO_RETRIEVED_FOLDER
        self._names = set(retrieved.base.repository.list_object_names())

        stderr = self.read_text(STDERR_FILENAME) or ''
        error_lines = [line[len('ERROR:'):].strip() for line in stderr.splitlines() if line.startswith('ERROR:')]
        error_message = error_lines[-1] if error_lines else None

        status = None
        status_text = self.read_text(EXIT_CODE_FILENAME)
        if status_text is not None:
            try:
                status = int(status_text.strip())
            except ValueError:
                status = None

        if status is not None and status != EXIT_OK:
            label = ENGINE_EXIT_CODES.get(status, 'ERROR_ENGINE_FAILED')
            message = error_message or tail(stderr) or f'engine exit status {status}'
            return self.exit_codes[label].format(message=message)
        if status is None and error_message is not None:
            lowered = error_message.lower()
            label = next((lab for pattern, lab in ERROR_PATTERNS if pattern in lowered), 'ERROR_ENGINE_FAILED')
            return self.exit_codes[label].format(message=error_message)

        calculation = self.CALCULATION
        missing = [name for name in (calculation.RESULTS_FILENAME, calculation.SUMMARY_FILENAME)
                   if name not in self._names]
        if missing:
            if self.node.exit_status:  # the scheduler parser already found a reason (out of memory, walltime, ...)
                return None
            detail = f'{", ".join(missing)} not retrieved'
            scheduler_stderr = self.read_text(self.node.get_option('scheduler_stderr') or '') or ''
            last_lines = tail(stderr) or tail(scheduler_stderr)
            if last_lines:
                detail += f'; engine stderr ends with: {last_lines}'
            elif status is None and EXIT_CODE_FILENAME not in self._names:
                detail += ' (the job script may not have run)'
            return self.exit_codes.ERROR_MISSING_OUTPUT_FILES.format(message=detail)

        try:
            with retrieved.base.repository.open(calculation.RESULTS_FILENAME, 'rb') as handle:
                with np.load(io.BytesIO(handle.read())) as npz:
                    arrays = {name: npz[name] for name in npz.files}
            summary = json.loads(self.read_text(calculation.SUMMARY_FILENAME))
            keys_text = self.read_text(calculation.KEYS_FILENAME)
            keys_info = json.loads(keys_text) if keys_text is not None else {}
        except Exception as exception:  # noqa: BLE001  (zip, pickle, json errors: all mean corrupt output)
            return self.exit_codes.ERROR_OUTPUT_CORRUPT.format(message=f'{type(exception).__name__}: {exception}')

        problem = self.check_outputs(arrays, summary, keys_info)
        if problem:
            return self.exit_codes.ERROR_OUTPUT_CORRUPT.format(message=problem)
        return self.store_outputs(arrays, summary, keys_info)

    def read_text(self, name: str):
        """Text of a retrieved file, or None when it was not retrieved."""
        if name not in self._names:
            return None
        return self.retrieved.base.repository.get_object_content(name, mode='r')

    def check_outputs(self, arrays: dict, summary: dict, keys_info: dict):
        """Why the engine's npz, summary and the job's keys do not fit together (exit code 310), or None."""
        raise NotImplementedError

    def store_outputs(self, arrays: dict, summary: dict, keys_info: dict):
        """Attach the outputs of consistent results; return an exit code or None."""
        raise NotImplementedError


def tail(text: str, lines: int = 3) -> str:
    """The last non-empty ``lines`` of ``text`` on one line (for exit messages)."""
    kept = [line.strip() for line in (text or '').splitlines() if line.strip()]
    return ' | '.join(kept[-lines:])
