"""Named MACE foundation models: where mace-torch publishes them, where they are cached, and their pinned hashes.

Nothing downloads unless asked: :func:`fetch_foundation` returns the cached file (the same cache and file name
mace-torch uses, so a file mace already fetched is reused), pins its sha256 on first use in a small JSON file next
to it and refuses a later change. Offline, or when ``allow_download`` is False, a missing file is a clear error that
says which file to provide, where, and how to import a local copy instead.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib

from aiida_mlip.data.model import ModelIntegrityError, sha256_of_file

_MP = 'https://github.com/ACEsuit/mace-mp/releases/download'

#: name -> mace-torch's own name (``mace_mp(model=...)``), URL (as in mace/calculators/foundations_models.py of
#: mace-torch 0.3.16) and licence.
FOUNDATION_MODELS = {
    'mace-mp-0-small': {'mace_name': 'small', 'url': f'{_MP}/mace_mp_0/2023-12-10-mace-128-L0_energy_epoch-249.model',
                        'license': 'MIT'},
    'mace-mp-0-medium': {'mace_name': 'medium', 'url': f'{_MP}/mace_mp_0/2023-12-03-mace-128-L1_epoch-199.model',
                         'license': 'MIT'},
    'mace-mp-0-large': {'mace_name': 'large', 'url': f'{_MP}/mace_mp_0/MACE_MPtrj_2022.9.model', 'license': 'MIT'},
    'mace-mp-0b-small': {'mace_name': 'small-0b', 'url': f'{_MP}/mace_mp_0b/mace_agnesi_small.model',
                         'license': 'MIT'},
    'mace-mp-0b-medium': {'mace_name': 'medium-0b', 'url': f'{_MP}/mace_mp_0b/mace_agnesi_medium.model',
                          'license': 'MIT'},
    'mace-mp-0b2-small': {'mace_name': 'small-0b2',
                          'url': f'{_MP}/mace_mp_0b2/mace-small-density-agnesi-stress.model', 'license': 'MIT'},
    'mace-mp-0b2-medium': {'mace_name': 'medium-0b2',
                           'url': f'{_MP}/mace_mp_0b2/mace-medium-density-agnesi-stress.model', 'license': 'MIT'},
    'mace-mp-0b2-large': {'mace_name': 'large-0b2',
                          'url': f'{_MP}/mace_mp_0b2/mace-large-density-agnesi-stress.model', 'license': 'MIT'},
    'mace-mp-0b3-medium': {'mace_name': 'medium-0b3', 'url': f'{_MP}/mace_mp_0b3/mace-mp-0b3-medium.model',
                           'license': 'MIT'},
    'mace-mpa-0-medium': {'mace_name': 'medium-mpa-0', 'url': f'{_MP}/mace_mpa_0/mace-mpa-0-medium.model',
                          'license': 'MIT'},
    'mace-omat-0-small': {'mace_name': 'small-omat-0', 'url': f'{_MP}/mace_omat_0/mace-omat-0-small.model',
                          'license': 'ASL'},
    'mace-omat-0-medium': {'mace_name': 'medium-omat-0', 'url': f'{_MP}/mace_omat_0/mace-omat-0-medium.model',
                           'license': 'ASL'},
}

#: mace-torch's short names ('small', 'medium-0b3', ...) are accepted too.
ALIASES = {entry['mace_name']: name for name, entry in FOUNDATION_MODELS.items()}

PIN_SUFFIX = '.aiida-mlip.json'


class FoundationModelUnavailable(FileNotFoundError):
    """A named foundation model is neither cached nor allowed/able to be downloaded."""


def resolve_name(name: str) -> str:
    """The registry name for ``name`` (a registry name or mace-torch's short name); ValueError listing the known ones."""
    if name in FOUNDATION_MODELS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise ValueError(f'unknown foundation model `{name}`; known: {", ".join(FOUNDATION_MODELS)}')


def default_cache_dir() -> pathlib.Path:
    """``$AIIDA_MLIP_CACHE``, else mace-torch's own cache (``$XDG_CACHE_HOME/mace`` or ``~/.cache/mace``)."""
    if os.environ.get('AIIDA_MLIP_CACHE'):
        return pathlib.Path(os.environ['AIIDA_MLIP_CACHE']).expanduser()
    return pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache')).expanduser() / 'mace'


def cached_file_name(url: str) -> str:
    """The file name mace-torch gives a downloaded model (alphanumerics and ``_`` of the URL's base name)."""
    return ''.join(c for c in os.path.basename(url) if c.isalnum() or c in '_')


def cache_path(name: str, cache_dir=None) -> pathlib.Path:
    """Where the file of foundation model ``name`` is expected."""
    entry = FOUNDATION_MODELS[resolve_name(name)]
    return pathlib.Path(cache_dir or default_cache_dir()) / cached_file_name(entry['url'])


def pin_path(path) -> pathlib.Path:
    path = pathlib.Path(path)
    return path.with_name(path.name + PIN_SUFFIX)


def _unavailable_message(name: str, path: pathlib.Path, reason: str) -> str:
    entry = FOUNDATION_MODELS[name]
    return (
        f'foundation model `{name}` is not available: {reason}. Provide the file yourself: download\n'
        f'  {entry["url"]}\n'
        f'on a machine with network access and copy it to\n'
        f'  {path}\n'
        f'or import any local copy with\n'
        f'  aiida-mlip model import FILE --label {name}'
    )


def _download(url: str, path: pathlib.Path, timeout: float = 120.0):
    """Stream ``url`` to ``path`` through a ``.part`` file (never leaves a truncated model behind)."""
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + '.part')
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, 'wb') as target:
            if 'text/html' in str(response.headers.get('Content-Type', '')):
                raise OSError(f'{url} returned an HTML page, not a model file')
            for chunk in iter(lambda: response.read(1 << 20), b''):
                target.write(chunk)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def fetch_foundation(name: str, cache_dir=None, allow_download: bool = False) -> pathlib.Path:
    """The local file of foundation model ``name``, sha256-pinned.

    Returns the cached file if present; downloads it only when ``allow_download`` is True (and a network answers).
    On first use the file's sha256 is recorded in ``<file>.aiida-mlip.json``; a later change of the file is refused.

    :raises FoundationModelUnavailable: the file is missing and may not or cannot be downloaded; the message names
        the URL, the expected cache path and the ``aiida-mlip model import`` alternative.
    :raises ModelIntegrityError: the cached file no longer matches its pinned hash.
    """
    name = resolve_name(name)
    entry = FOUNDATION_MODELS[name]
    path = cache_path(name, cache_dir)
    if not path.is_file():
        if not allow_download:
            raise FoundationModelUnavailable(_unavailable_message(name, path, 'it is not in the cache and downloads '
                                                                             'are not allowed (allow_download=False)'))
        try:
            _download(entry['url'], path)
        except OSError as exception:  # URLError, timeouts, DNS failures are OSErrors
            raise FoundationModelUnavailable(
                _unavailable_message(name, path, f'the download failed ({exception})')
            ) from exception
    sha256 = sha256_of_file(path)
    pin = pin_path(path)
    if pin.is_file():
        pinned = json.loads(pin.read_text())
        if pinned.get('sha256') != sha256:
            raise ModelIntegrityError(
                f'cached foundation model `{name}` at {path} has changed: expected sha256 {pinned.get("sha256")} '
                f'(pinned {pinned.get("pinned_at")}), found {sha256}; delete both {path} and {pin} to fetch it again'
            )
    else:
        pin.write_text(json.dumps({
            'name': name, 'url': entry['url'], 'sha256': sha256,
            'pinned_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        }, indent=2))
    return path


def load_foundation(name: str, cache_dir=None, allow_download: bool = False):
    """An ``MlipModel`` node (origin 'foundation') for foundation model ``name``; reuses a stored node of equal hash."""
    from aiida_mlip.data.model import MlipModel

    name = resolve_name(name)
    path = fetch_foundation(name, cache_dir=cache_dir, allow_download=allow_download)
    sha256 = sha256_of_file(path)
    existing = MlipModel.find_by_sha256(sha256)
    if existing is not None:
        return existing
    node = MlipModel.from_file(path, origin='foundation', source=FOUNDATION_MODELS[name]['url'],
                               foundation_name=name, expected_sha256=sha256, label=name)
    return node.store()
