"""Batched (committee) MACE evaluation that runs on the compute node.

This module must stay free of AiiDA imports: it is executed on remote
machines where only torch, mace-torch, ase and numpy are installed.  Heavy
imports (torch, mace, ase) are done lazily inside functions so that the AiiDA
side can import the constants below (npz keys, exit codes) cheaply.

It can be run as ``python -m aiida_mlip.engine.evaluate`` or, when the file is
copied alone to a remote machine, as ``python evaluate.py``.

Committee statistics use the population (``ddof=0``) standard deviation over
models, like ``MACECalculator`` (``torch.var(..., unbiased=False)``).  The
per-structure force uncertainty is::

    max_force_deviation = max_i sqrt( mean_m || F_i^m - <F_i> ||^2 )

i.e. the largest, over atoms ``i``, Euclidean norm of the per-component force
standard-deviation vector (the DP-GEN ``max_devi_f`` definition).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

#: Process exit codes of the command-line entry points (shared with ``md.py``).
EXIT_OK = 0
EXIT_MISSING_ELEMENT = 2
EXIT_BAD_MODEL = 3
EXIT_BAD_STRUCTURES = 4

#: Keys of the evaluation ``.npz``; ``stresses`` is absent with --no-stress, committee keys need M > 1.
NPZ_KEYS = ('energies', 'forces', 'stresses', 'n_atoms', 'atomic_numbers', 'pbc')
NPZ_COMMITTEE_KEYS = (
    'energy_mean',
    'energy_std',
    'forces_mean',
    'forces_std',
    'stress_mean',
    'stress_std',
    'max_force_deviation',
)

# Same info/arrays keys MACECalculator forwards to the model, so that batched and
# per-structure evaluation see identical inputs (labels are deliberately NOT read).
_INFO_KEYS = {'total_spin': 'spin', 'total_charge': 'charge', 'external_field': 'external_field'}
_ARRAYS_KEYS = {'charges': 'Qs'}


class ModelLoadError(RuntimeError):
    """A model file is missing, unreadable or not a MACE model."""


class MissingElementsError(ValueError):
    """Structures contain elements that a model was not trained on."""


def _torch():
    """Import torch lazily (the AiiDA side only needs the constants above)."""
    import torch

    return torch


#: Submodules of ``mace.tools`` that model loading and inference take names from (see :func:`light_mace_tools`).
_MACE_TOOLS_INFERENCE = ('torch_tools', 'utils', 'default_keys', 'scatter', 'cg', 'torch_geometric')


def light_mace_tools() -> bool:
    """Make ``mace.tools`` importable without its ``__init__`` (mace's training stack); True if installed.

    ``mace/tools/__init__.py`` imports everything of the package, including ``mace.tools.train`` (torchmetrics,
    and matplotlib through ``mace.cli.visualise_train``), checkpoints and the argument parsers. ``mace.modules``
    (needed to unpickle a model) and ``mace.data`` take names from ``mace.tools`` (``from mace.tools import
    to_numpy``), so importing mace's submodules directly does not avoid that ``__init__``. This registers the
    package module WITHOUT running it; a name asked of it is looked up in the submodules inference uses
    (:data:`_MACE_TOOLS_INFERENCE`), and any other name runs the real ``__init__`` once (the full import, as
    without this function). Only the engine command calls it, before its first mace import (about 1 s of CPU per
    job, docs/performance.md); it does nothing when ``mace.tools`` is imported already or cannot be found.
    """
    if 'mace.tools' in sys.modules:
        return False
    import importlib
    import importlib.util

    try:
        spec = importlib.util.find_spec('mace.tools')
    except ImportError:
        return False
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return False
    package = importlib.util.module_from_spec(spec)
    missing = object()

    def __getattr__(name):
        if name.startswith('__'):
            raise AttributeError(name)
        for submodule_name in _MACE_TOOLS_INFERENCE:
            submodule = importlib.import_module(f'{spec.name}.{submodule_name}')
            if submodule_name == name:
                return submodule
            value = getattr(submodule, name, missing)
            if value is not missing:
                return value
        # Not an inference name: become the real package (run its __init__ in this module) and answer from it.
        del package.__getattr__
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = __getattr__
    sys.modules[spec.name] = package
    return True


def load_models(
    paths: Sequence[os.PathLike | str],
    device: str = 'cpu',
    dtype: Optional[str] = None,
) -> List[Any]:
    """Load MACE models once, in eval mode, optionally converted to ``dtype``.

    ``dtype`` is ``'float64'``, ``'float32'`` or ``None`` (keep the stored dtype).
    Raises :class:`ModelLoadError` naming the file on any failure, so that the CLI
    can map it to a dedicated exit code.
    """
    torch = _torch()
    if dtype not in (None, 'float32', 'float64'):
        raise ValueError(f'dtype must be float32, float64 or None, got {dtype!r}')
    if not paths:
        raise ModelLoadError('no model files given')
    models = []
    for path in paths:
        try:
            model = torch.load(str(path), map_location=device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot read model"
            raise ModelLoadError(f'cannot read model {path}: {type(exc).__name__}: {exc}') from exc
        if not isinstance(model, torch.nn.Module) or not hasattr(model, 'atomic_numbers') or not hasattr(
            model, 'r_max'
        ):
            raise ModelLoadError(f'{path} does not contain a MACE model (got {type(model).__name__})')
        if dtype == 'float64':
            model = model.double()
        elif dtype == 'float32':
            model = model.float()
        model = model.to(device)
        model.eval()
        for param in model.parameters():
            param.requires_grad = False
        models.append(model)
    return models


def model_elements(model) -> List[int]:
    """Atomic numbers a model was trained on (its one-hot table)."""
    return [int(z) for z in model.atomic_numbers]


def model_heads(model) -> List[str]:
    """Readout heads of a model (``['Default']`` for old single-head models)."""
    heads = getattr(model, 'heads', None)
    return list(heads) if heads else ['Default']


def _select_head(model, head: Optional[str]) -> str:
    """Pick the head like MACECalculator: the only one, else the one named 'default'."""
    heads = model_heads(model)
    if head is not None:
        if head not in heads:
            raise ValueError(f'head {head!r} not in model heads {heads}')
        return head
    if len(heads) == 1:
        return heads[0]
    default = [h for h in heads if h.lower() == 'default']
    if not default:
        raise ValueError(f'model has several heads {heads} and none is "default"; pass head=')
    return default[0]


def check_elements(models: Sequence[Any], atoms_list: Sequence[Any]) -> None:
    """Refuse structures with elements unknown to any model, before any evaluation.

    A model silently maps unknown elements to nothing sensible, so this is a hard
    error naming the offending symbols (and the structure indices containing them).
    """
    from ase.data import chemical_symbols

    present: Dict[int, List[int]] = {}
    for index, atoms in enumerate(atoms_list):
        for z in set(int(z) for z in atoms.numbers):
            present.setdefault(z, []).append(index)
    problems = []
    for m_index, model in enumerate(models):
        missing = sorted(set(present) - set(model_elements(model)))
        if missing:
            parts = []
            for z in missing:
                where = present[z]
                shown = ','.join(str(i) for i in where[:5]) + (',...' if len(where) > 5 else '')
                parts.append(f'{chemical_symbols[z]} (structures {shown})')
            known = ' '.join(chemical_symbols[z] for z in model_elements(model))
            problems.append(f'model {m_index} [{known}] lacks {", ".join(parts)}')
    if problems:
        raise MissingElementsError('elements not supported by the model: ' + '; '.join(problems))


class _GraphDataset:
    """Lazily converts ase.Atoms to mace AtomicData graphs (float64, cast per model later)."""

    def __init__(self, atoms_list, z_table, r_max, heads, head_name):
        self.atoms_list = atoms_list
        self.z_table = z_table
        self.r_max = r_max
        self.heads = heads
        self.head_name = head_name

    def __len__(self):
        return len(self.atoms_list)

    def __getitem__(self, index):
        from mace import data as mace_data
        from mace.tools import torch_tools

        keyspec = mace_data.KeySpecification(info_keys=dict(_INFO_KEYS), arrays_keys=dict(_ARRAYS_KEYS))
        with torch_tools.default_dtype('float64'):
            config = mace_data.config_from_atoms(
                self.atoms_list[index], key_specification=keyspec, head_name=self.head_name
            )
            return mace_data.AtomicData.from_config(
                config, z_table=self.z_table, cutoff=self.r_max, heads=self.heads
            )


def _graph_key(model, head: Optional[str]):
    """Models sharing this key can share the same neighbour lists / one-hot graphs."""
    heads = model_heads(model)
    return (float(model.r_max), tuple(model_elements(model)), tuple(heads), _select_head(model, head))


def evaluate(
    models: Sequence[Any],
    atoms_list: Sequence[Any],
    batch_size: int = 8,
    compute_stress: bool = True,
    head: Optional[str] = None,
) -> Dict[str, Any]:
    """Evaluate every structure with every model through mace's batched data pipeline.

    Graphs are built once per batch and shared by all models with the same cutoff,
    element table and heads (the usual committee case).  Returns::

        n_atoms   (N,) int
        energies  (M, N) eV
        forces    list of N arrays (M, n_i, 3) eV/Å
        stresses  (M, N, 3, 3) eV/Å^3, ASE sign (== atoms.get_stress(voigt=False)),
                  or None if compute_stress is False.  Only meaningful for fully
                  periodic cells (mace uses a placeholder cell otherwise; values are
                  kept identical to MACECalculator, mask them with the npz ``pbc``)
        # only for committees (M > 1), population std over models:
        energy_mean, energy_std          (N,)
        forces_mean, forces_std          list of N arrays (n_i, 3)
        stress_mean, stress_std          (N, 3, 3) (None without stress)
        max_force_deviation              (N,) = max_i sqrt(mean_m |F_i^m - <F_i>|^2)
    """
    torch = _torch()
    from mace.tools import torch_geometric
    from mace.tools.utils import AtomicNumberTable

    models = list(models)
    if not models:
        raise ValueError('no models given')
    atoms_list = list(atoms_list)
    if batch_size < 1:
        raise ValueError('batch_size must be >= 1')
    check_elements(models, atoms_list)

    n_models, n_struct = len(models), len(atoms_list)
    n_atoms = np.array([len(a) for a in atoms_list], dtype=np.int64)
    energies = np.zeros((n_models, n_struct))
    forces = [np.zeros((n_models, n, 3)) for n in n_atoms]
    stresses = np.zeros((n_models, n_struct, 3, 3)) if compute_stress else None

    groups: Dict[tuple, List[int]] = {}
    for m_index, model in enumerate(models):
        groups.setdefault(_graph_key(model, head), []).append(m_index)

    for (r_max, zs, heads, head_name), members in groups.items():
        dataset = _GraphDataset(atoms_list, AtomicNumberTable(list(zs)), r_max, list(heads), head_name)
        loader = torch_geometric.dataloader.DataLoader(
            dataset=dataset, batch_size=batch_size, shuffle=False, drop_last=False
        )
        start = 0
        for batch in loader:
            n_graphs = int(batch.num_graphs)
            ptr = batch.ptr.cpu().numpy()
            for m_index in members:
                model = models[m_index]
                param = next(model.parameters())
                model_batch = batch.clone().to(param.device)
                for key in model_batch.keys:
                    value = model_batch[key]
                    if torch.is_tensor(value) and torch.is_floating_point(value):
                        model_batch[key] = value.to(dtype=param.dtype)
                out = model(model_batch.to_dict(), compute_stress=compute_stress, training=False)
                e = out['energy'].detach().cpu().double().numpy()
                f = out['forces'].detach().cpu().double().numpy()
                energies[m_index, start : start + n_graphs] = e
                for g in range(n_graphs):
                    forces[start + g][m_index] = f[ptr[g] : ptr[g + 1]]
                if compute_stress:
                    stresses[m_index, start : start + n_graphs] = out['stress'].detach().cpu().double().numpy()
            start += n_graphs
        assert start == n_struct

    results: Dict[str, Any] = {
        'n_atoms': n_atoms,
        'energies': energies,
        'forces': forces,
        'stresses': stresses,
    }
    if n_models > 1:
        results.update(committee_statistics(energies, forces, stresses))
    return results


def committee_statistics(energies, forces, stresses=None) -> Dict[str, Any]:
    """Mean / population std over the model axis, and the max force deviation."""
    forces_mean = [f.mean(axis=0) for f in forces]
    forces_std = [f.std(axis=0) for f in forces]
    max_dev = np.array([np.sqrt((s**2).sum(axis=-1)).max() if len(s) else 0.0 for s in forces_std])
    return {
        'energy_mean': energies.mean(axis=0),
        'energy_std': energies.std(axis=0),
        'forces_mean': forces_mean,
        'forces_std': forces_std,
        'stress_mean': None if stresses is None else stresses.mean(axis=0),
        'stress_std': None if stresses is None else stresses.std(axis=0),
        'max_force_deviation': max_dev,
    }


def results_to_arrays(results: Dict[str, Any], atoms_list=None) -> Dict[str, np.ndarray]:
    """Flatten :func:`evaluate` output into fixed-shape arrays for one ``.npz``.

    Per-atom quantities are concatenated over structures; split them again with
    ``np.split(arr, np.cumsum(n_atoms)[:-1], axis=...)`` (see :func:`split_per_atom`).
    """
    arrays: Dict[str, np.ndarray] = {
        'energies': np.asarray(results['energies']),
        'n_atoms': np.asarray(results['n_atoms'], dtype=np.int64),
    }
    n_models = arrays['energies'].shape[0]
    forces = results['forces']
    arrays['forces'] = np.concatenate(forces, axis=1) if forces else np.zeros((n_models, 0, 3))
    if results.get('stresses') is not None:
        arrays['stresses'] = np.asarray(results['stresses'])
    if atoms_list is not None:
        numbers = [np.asarray(a.numbers, dtype=np.int64) for a in atoms_list]
        arrays['atomic_numbers'] = np.concatenate(numbers) if numbers else np.zeros(0, dtype=np.int64)
        arrays['pbc'] = np.array([a.pbc for a in atoms_list], dtype=bool).reshape(len(atoms_list), 3)
    if 'max_force_deviation' in results:
        for key in ('energy_mean', 'energy_std', 'stress_mean', 'stress_std', 'max_force_deviation'):
            if results.get(key) is not None:
                arrays[key] = np.asarray(results[key])
        for key in ('forces_mean', 'forces_std'):
            arrays[key] = np.concatenate(results[key], axis=0) if results[key] else np.zeros((0, 3))
    return arrays


def split_per_atom(array: np.ndarray, n_atoms: np.ndarray, axis: int = 0) -> List[np.ndarray]:
    """Undo the per-atom concatenation of the npz (``forces`` uses ``axis=1``)."""
    return np.split(array, np.cumsum(n_atoms)[:-1], axis=axis)


def file_sha256(path: os.PathLike | str) -> str:
    """Checksum recorded in the summary so results can be tied to the exact model file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def software_versions() -> Dict[str, str]:
    """Versions of the numerical stack, for provenance in the summary files."""
    versions = {'python': sys.version.split()[0], 'numpy': np.__version__}
    for name in ('mace', 'torch', 'ase', 'e3nn'):
        try:
            versions[name] = getattr(__import__(name), '__version__', 'unknown')
        except Exception:  # noqa: BLE001
            versions[name] = 'unavailable'
    return versions


def write_npz_atomic(path: os.PathLike | str, arrays: Dict[str, np.ndarray]) -> None:
    """Write the npz via a temporary file so a killed job never leaves a truncated result."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix='.tmp', dir=str(path.parent.resolve()))
    try:
        with os.fdopen(fd, 'wb') as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: os.PathLike | str, data: Dict[str, Any]) -> None:
    """Write a small JSON summary (atomically, like the npz)."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + '\n')
    os.replace(tmp, path)


def set_threads(threads: int) -> None:
    """Pin torch intra-op threads (clusters often oversubscribe cores otherwise)."""
    torch = _torch()
    torch.set_num_threads(max(1, int(threads)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set after parallel work started
        pass


def read_structures(path: os.PathLike | str) -> list:
    """Read every frame of a structure file (extxyz, or anything ase understands)."""
    import ase.io

    frames = ase.io.read(str(path), index=':')
    return frames if isinstance(frames, list) else [frames]


def fail(message: str, code: int) -> int:
    """One-line error on stderr for the scheduler log; the exit code carries the class."""
    sys.stderr.write('ERROR: ' + ' '.join(str(message).split()) + '\n')
    sys.stderr.flush()
    return code


# ---- command line (shared with md.py) ------------------------------------------------------------------------------

def engine_parser(prog: str, description: str, output: str) -> argparse.ArgumentParser:
    """Argument parser with the options every engine command has (models, output files, dtype, device, threads)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument('--models', nargs='+', required=True, help='MACE model files (several = committee)')
    parser.add_argument('--output', default=output, help='npz output (a .json summary is written next to it)')
    parser.add_argument('--summary', default=None, help='summary JSON path (default: output with .json suffix)')
    parser.add_argument('--dtype', choices=['float64', 'float32'], default=None, help='default: the model dtype')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--head', default=None, help='model head (default: the only/"default" one)')
    parser.add_argument('--threads', type=int, default=1, help='torch.set_num_threads')
    return parser


def run_engine(args: argparse.Namespace, structures: str, job) -> int:
    """What every engine command does around its work; returns the exit status.

    Pins the threads, reads every frame of ``structures``, loads the models ONCE and checks their elements (each
    failure: one ``ERROR:`` line on stderr and exit status 4, 3 or 2), then calls ``job(models, atoms_list)``, which
    writes ``args.output`` and returns ``(summary, message)``. The summary gets the model files and checksums, the
    wall time and the software versions and is written as JSON next to the output; the message goes to stdout.
    """
    t_start = time.perf_counter()
    light_mace_tools()
    set_threads(args.threads)
    try:
        atoms_list = read_structures(structures)
    except Exception as exc:  # noqa: BLE001
        return fail(f'cannot read structures {structures}: {type(exc).__name__}: {exc}', EXIT_BAD_STRUCTURES)
    try:
        models = load_models(args.models, device=args.device, dtype=args.dtype)
        sha256 = [file_sha256(p) for p in args.models]
    except ModelLoadError as exc:
        return fail(str(exc), EXIT_BAD_MODEL)
    try:
        check_elements(models, atoms_list)
    except MissingElementsError as exc:
        return fail(str(exc), EXIT_MISSING_ELEMENT)

    summary, message = job(models, atoms_list)
    output = Path(args.output)
    versions = software_versions()
    summary.update({
        'models': [str(p) for p in args.models],
        'model_sha256': sha256,
        'wall_seconds': time.perf_counter() - t_start,
        'mace_version': versions['mace'],
        'versions': versions,
        'output': output.name,
    })  # fmt: skip
    write_json(args.summary or output.with_suffix('.json'), summary)
    print(message)
    return EXIT_OK


def exit_process(status: int) -> None:
    """End the engine process NOW with ``status``, skipping the interpreter's shutdown.

    By the time ``main`` returns, every output is complete: the npz and the JSON are written to temporary files,
    closed and renamed into place (:func:`write_npz_atomic`, :func:`write_json`), the extxyz trajectory is written
    and closed by ``ase.io.write``; only stdout/stderr may still hold buffered text, flushed here. What
    :func:`os._exit` skips is the normal interpreter shutdown: garbage collection of every module (torch, mace,
    e3nn, sympy, scipy: ~1.3 s for an engine process, measured in docs/performance.md), ``atexit`` handlers (the
    engine registers none) and the flushing of Python-level file objects (all closed already). A job waits for
    that shutdown for nothing; the exit status is the same.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _parser() -> argparse.ArgumentParser:
    parser = engine_parser(
        'python -m aiida_mlip.engine.evaluate', 'Evaluate all structures of a file with one MACE model or a committee.',
        output='results.npz',
    )
    parser.add_argument('--structures', required=True, help='structure file, all frames are read')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--no-stress', action='store_true', help='skip the stress (cell-gradient) computation')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 missing element, 3 bad model, 4 bad structures)."""
    args = _parser().parse_args(argv)

    def job(models, atoms_list):
        t_eval = time.perf_counter()
        results = evaluate(
            models, atoms_list, batch_size=args.batch_size, compute_stress=not args.no_stress, head=args.head
        )
        eval_seconds = time.perf_counter() - t_eval
        write_npz_atomic(args.output, results_to_arrays(results, atoms_list))
        summary = {
            'n_structures': len(atoms_list),
            'n_models': len(models),
            'n_atoms_total': int(results['n_atoms'].sum()),
            'committee': len(models) > 1,
            'compute_stress': not args.no_stress,
            'batch_size': args.batch_size,
            'dtype': str(next(models[0].parameters()).dtype).replace('torch.', ''),
            'threads': args.threads,
            'eval_seconds': eval_seconds,
        }
        return summary, f'evaluated {len(atoms_list)} structures with {len(models)} model(s) in {eval_seconds:.2f} s'

    return run_engine(args, args.structures, job)


if __name__ == '__main__':
    exit_process(main())
