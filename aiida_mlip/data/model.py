"""``mlip.model``: a MACE model file in the node repository, pinned by its sha256.

The file is read once when the node is made: its bytes are hashed, loaded with torch to read what a query or a
validator needs (elements, cutoff, dtype) and stored from the same bytes, so what was inspected is what is stored.
Every later use writes the file out through :meth:`MlipModel.open_verified` / :meth:`MlipModel.verified_path`,
which re-hash the repository content and the written copy and refuse a mismatch naming both hashes.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import shutil
import tempfile

from aiida import orm

#: How a model came to exist.
ORIGINS = ('trained', 'imported', 'foundation')
#: Bytes read at a time when hashing or copying.
_CHUNK = 1 << 20


class ModelIntegrityError(ValueError):
    """A model file's content does not match the sha256 it was pinned with."""


def sha256_of_file(path) -> str:
    """Hex sha256 of a file on disk, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def installed_mace_version() -> str | None:
    try:
        from importlib.metadata import version

        return version('mace-torch')
    except Exception:  # noqa: BLE001  (no mace: the version is simply unknown)
        return None


def inspect_mace_model(content: bytes, source: str = 'the file') -> dict:
    """Load a MACE model from bytes (CPU) and return the attributes a node records; ValueError if it is not one."""
    # mace prints a notice on import (stdout stays clean for machine-readable output); it must be imported before
    # e3nn, and the pickled classes of a model live in mace.modules.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            import mace  # noqa: F401
            import mace.modules  # noqa: F401
        except ImportError as exception:
            raise ValueError(f'cannot inspect {source}: mace-torch is not installed ({exception})') from exception
    import torch

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = torch.load(io.BytesIO(content), weights_only=False, map_location='cpu')
    except Exception as exception:  # noqa: BLE001  (torch raises many types for non-model files)
        raise ValueError(
            f'{source} is not a MACE model file readable by torch.load ({type(exception).__name__}: {exception})'
        ) from exception
    class_name = type(model).__name__
    if not isinstance(model, torch.nn.Module) or not hasattr(model, 'atomic_numbers') or not hasattr(model, 'r_max'):
        raise ValueError(
            f'{source} holds a `{class_name}`, not a MACE model (a torch module with `atomic_numbers` and `r_max`); '
            'a training checkpoint (*.pt) or a TorchScript-compiled model is not accepted: give the `.model` file'
        )
    if 'MACE' not in class_name.upper():
        raise ValueError(f'{source} holds a `{class_name}` model: only MACE architectures are supported')
    from ase.data import chemical_symbols

    numbers = sorted(int(z) for z in model.atomic_numbers.tolist())
    parameters = list(model.parameters())
    dtype = str(parameters[0].dtype).replace('torch.', '') if parameters else None
    heads = [str(head) for head in getattr(model, 'heads', None) or []]
    return {
        'architecture': 'MACE',
        'model_class': class_name,
        'atomic_numbers': numbers,
        'elements': sorted(chemical_symbols[z] for z in numbers),
        'r_max': float(model.r_max.item() if hasattr(model.r_max, 'item') else model.r_max),
        'dtype': dtype,
        'heads': heads,
        'num_interactions': int(model.num_interactions.item()) if hasattr(model, 'num_interactions') else None,
        'num_parameters': int(sum(p.numel() for p in parameters)),
    }


class MlipModel(orm.Data):
    """A machine-learning interatomic potential file (MACE ``.model``) with its sha256, elements and cutoff.

    Attributes: ``sha256``, ``architecture`` ('MACE'), ``model_class``, ``elements`` (sorted symbols),
    ``atomic_numbers``, ``r_max`` (Å), ``dtype``, ``heads``, ``num_interactions``, ``num_parameters``,
    ``file_size``, ``mace_version``, ``origin`` ('trained' | 'imported' | 'foundation'), ``source`` (path or URL
    text) and, for named foundation models, ``foundation_name``. Where a trained model came from is in the
    provenance graph (its creator is a ``MaceTrainCalculation``), not in attributes.
    """

    FILENAME = 'model.model'

    def __init__(self, file=None, origin: str = 'imported', source: str | None = None, **kwargs):
        metadata = {key: kwargs.pop(key) for key in ('foundation_name', 'mace_version', 'expected_sha256')
                    if key in kwargs}
        super().__init__(**kwargs)
        if file is not None:
            self._set_file(file, origin=origin, source=source, **metadata)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def find(cls, identifier: str) -> 'MlipModel':
        """The one model named by pk, UUID, label or sha256 prefix (>= 8 characters); a ValueError otherwise."""
        from aiida.common.exceptions import MultipleObjectsError, NotExistent

        try:
            node = orm.load_node(identifier)
        except (NotExistent, MultipleObjectsError, ValueError):
            node = None
            if len(identifier) >= 8:  # a sha256 prefix
                query = orm.QueryBuilder().append(cls, filters={'attributes.sha256': {'like': f'{identifier}%'}})
                if query.count() == 1:
                    node = query.one()[0]
            if node is None:
                query = orm.QueryBuilder().append(cls, filters={'label': identifier})
                if query.count() == 1:
                    node = query.one()[0]
        if not isinstance(node, cls):
            raise ValueError(f'no single mlip.model node matches `{identifier}` (pk, UUID, label or sha256 prefix)')
        return node

    @classmethod
    def from_file(cls, path, origin: str = 'imported', source: str | None = None, **metadata) -> 'MlipModel':
        """An unstored node from a MACE ``.model`` file on disk.

        :param origin: 'trained', 'imported' or 'foundation'.
        :param source: where the file came from (defaults to the absolute path).
        :param metadata: ``foundation_name``, ``mace_version`` (default: the installed mace-torch),
            ``expected_sha256`` (refuse the file unless it has this hash), ``label``, ``description``.
        :raises ValueError: if the file is not a MACE model; :class:`ModelIntegrityError` on a hash mismatch.
        """
        node_kwargs = {key: metadata.pop(key) for key in ('label', 'description') if key in metadata}
        return cls(file=path, origin=origin, source=source, **metadata, **node_kwargs)

    def _set_file(self, path, origin: str, source: str | None, foundation_name: str | None = None,
                  mace_version: str | None = None, expected_sha256: str | None = None):
        if origin not in ORIGINS:
            raise ValueError(f'origin must be one of {ORIGINS}, got `{origin}`')
        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(f'model file `{path}` does not exist')
        content = path.read_bytes()  # read once: hash, inspect and store the same bytes
        sha256 = hashlib.sha256(content).hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise ModelIntegrityError(
                f'model file `{path}` has changed: expected sha256 {expected_sha256}, found {sha256}'
            )
        info = inspect_mace_model(content, source=f'`{path}`')
        self.base.repository.put_object_from_filelike(io.BytesIO(content), self.FILENAME)
        attributes = self.base.attributes
        for key, value in info.items():
            attributes.set(key, value)
        attributes.set('sha256', sha256)
        attributes.set('file_size', len(content))
        attributes.set('origin', origin)
        attributes.set('source', str(source) if source is not None else str(path.resolve()))
        attributes.set('mace_version', mace_version or installed_mace_version())
        if foundation_name is not None:
            attributes.set('foundation_name', foundation_name)

    def _validate(self):
        super()._validate()
        for key in ('sha256', 'elements', 'r_max', 'origin'):
            if self.base.attributes.get(key, None) is None:
                raise ValueError(f'an MlipModel needs the `{key}` attribute: build it with MlipModel.from_file')
        self.verify()

    # ---- properties --------------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        return self.base.attributes.get('sha256')

    @property
    def elements(self) -> list[str]:
        return self.base.attributes.get('elements')

    @property
    def r_max(self) -> float:
        return self.base.attributes.get('r_max')

    @property
    def dtype(self) -> str:
        return self.base.attributes.get('dtype')

    @property
    def origin(self) -> str:
        return self.base.attributes.get('origin')

    @property
    def source(self) -> str:  # text (path or URL), unlike ``orm.Data.source`` which is a dict
        return self.base.attributes.get('source')

    @property
    def foundation_name(self) -> str | None:
        return self.base.attributes.get('foundation_name', None)

    def covers(self, elements) -> list[str]:
        """The elements among ``elements`` this model has never seen (empty list: all covered)."""
        return sorted(set(elements) - set(self.elements))

    # ---- integrity ---------------------------------------------------------------------------------
    def repository_sha256(self) -> str:
        """sha256 of the file as it is now in the repository."""
        digest = hashlib.sha256()
        with self.base.repository.open(self.FILENAME, 'rb') as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b''):
                digest.update(chunk)
        return digest.hexdigest()

    def verify(self) -> str:
        """Re-hash the repository content; :class:`ModelIntegrityError` naming both hashes if it changed."""
        found = self.repository_sha256()
        if found != self.sha256:
            raise ModelIntegrityError(
                f'model file of MlipModel<{self.pk}> has changed in the repository: expected sha256 {self.sha256}, '
                f'found {found}; refusing to use it'
            )
        return found

    @staticmethod
    def check_file(path, expected_sha256: str) -> str:
        """Hash a model file on disk and refuse it unless it matches ``expected_sha256``; returns the hash."""
        found = sha256_of_file(path)
        if found != expected_sha256:
            raise ModelIntegrityError(
                f'model file `{path}` has changed: expected sha256 {expected_sha256}, found {found}; refusing to use it'
            )
        return found

    def write_verified(self, path) -> pathlib.Path:
        """Write the model file to ``path`` while hashing it; the written bytes must match the pinned sha256."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with self.base.repository.open(self.FILENAME, 'rb') as source, open(path, 'wb') as target:
            for chunk in iter(lambda: source.read(_CHUNK), b''):
                digest.update(chunk)
                target.write(chunk)
        found = digest.hexdigest()
        if found != self.sha256:
            path.unlink(missing_ok=True)
            raise ModelIntegrityError(
                f'model file of MlipModel<{self.pk}> has changed in the repository: expected sha256 {self.sha256}, '
                f'found {found}; refusing to use it'
            )
        self.check_file(path, self.sha256)  # what is on disk now is what was pinned
        return path

    @contextlib.contextmanager
    def open_verified(self):
        """Context manager: the path of a verified private copy of the model file, removed on exit."""
        directory = tempfile.mkdtemp(prefix='aiida-mlip-model-')
        try:
            yield self.write_verified(pathlib.Path(directory) / self.FILENAME)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def verified_path(self, directory=None) -> pathlib.Path:
        """A path to a verified copy of the model file, re-checked on every call.

        The repository content is re-hashed every time; the copy lives in ``directory`` (default: a content-addressed
        cache ``$TMPDIR/aiida-mlip-models/<sha256>.model``) and is rewritten if it no longer matches. Prefer
        :meth:`open_verified` when the file must not outlive its use.
        """
        self.verify()
        if directory is None:
            directory = pathlib.Path(tempfile.gettempdir()) / 'aiida-mlip-models'
        path = pathlib.Path(directory) / f'{self.sha256}.model'
        if path.is_file():
            try:
                self.check_file(path, self.sha256)
                return path
            except ModelIntegrityError:
                path.unlink()
        temporary = path.with_name(f'.{path.name}.{os.getpid()}.part')
        self.write_verified(temporary)
        os.replace(temporary, path)
        return path

    # ---- queries -----------------------------------------------------------------------------------
    @classmethod
    def find_by_sha256(cls, sha256: str) -> 'MlipModel | None':
        """The first stored model with this file hash, or None."""
        query = orm.QueryBuilder().append(cls, filters={'attributes.sha256': sha256}, project='*')
        result = query.first()
        return result[0] if result else None

    def __str__(self):
        stored = f'<{self.pk}>' if self.is_stored else '(unstored)'
        return (
            f'MlipModel{stored} {self.base.attributes.get("architecture", "?")} {",".join(self.elements or [])} '
            f'r_max={self.r_max} {self.dtype} origin={self.origin} sha256={self.sha256[:12]}'
        )
