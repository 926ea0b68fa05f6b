"""``mlip.model``: attributes read from the real file, sha256 pinning and tamper refusal, foundation cache, CLI."""
import hashlib
import io
import shutil

import pytest
from aiida import orm

from aiida_mlip.data import foundations
from aiida_mlip.data.foundations import FOUNDATION_MODELS, FoundationModelUnavailable, fetch_foundation
from aiida_mlip.data.model import MlipModel, ModelIntegrityError

from .fixtures_mlip import mlip_codes, si_dataset, si_splits, trained, untrained_si_ge, write_untrained_mace  # noqa: F401


@pytest.fixture
def model_file(tmp_path):
    return write_untrained_mace(tmp_path / 'si.model', elements=('Si',), r_max=3.5, seed=1)


def test_from_file_reads_the_model(aiida_profile, untrained_si_ge):
    node = MlipModel.from_file(untrained_si_ge, label='si-ge')
    assert node.elements == ['Ge', 'Si'] and node.base.attributes.get('atomic_numbers') == [14, 32]
    assert node.r_max == pytest.approx(4.0) and node.dtype == 'float32'
    assert node.base.attributes.get('architecture') == 'MACE' and node.origin == 'imported'
    assert node.source == str(untrained_si_ge.resolve())
    assert node.sha256 == hashlib.sha256(untrained_si_ge.read_bytes()).hexdigest()
    assert node.covers(['Si', 'Ge', 'C', 'Si']) == ['C'] and node.covers(['Si']) == []
    node.store()
    assert orm.load_node(node.pk).elements == ['Ge', 'Si']
    assert MlipModel.find_by_sha256(node.sha256).pk == node.pk


def test_non_models_are_refused(aiida_profile, tmp_path):
    import torch

    text = tmp_path / 'notes.model'
    text.write_text('not a model')
    with pytest.raises(ValueError, match='not a MACE model file readable by torch.load'):
        MlipModel.from_file(text)
    state = tmp_path / 'weights.pt'
    torch.save({'weights': torch.zeros(3)}, state)
    with pytest.raises(ValueError, match='holds a `dict`, not a MACE model'):
        MlipModel.from_file(state)
    with pytest.raises(ValueError, match='does not exist'):
        MlipModel.from_file(tmp_path / 'missing.model')
    with pytest.raises(ValueError, match='origin must be one of'):
        MlipModel.from_file(text, origin='downloaded')


def test_a_file_changed_on_disk_after_hashing_is_refused(aiida_profile, model_file):
    pinned = MlipModel.check_file(model_file, hashlib.sha256(model_file.read_bytes()).hexdigest())
    with open(model_file, 'ab') as handle:  # the file changes after its hash was recorded
        handle.write(b'\0')
    changed = hashlib.sha256(model_file.read_bytes()).hexdigest()
    with pytest.raises(ModelIntegrityError, match=f'expected sha256 {pinned}, found {changed}'):
        MlipModel.check_file(model_file, pinned)
    with pytest.raises(ModelIntegrityError, match=f'expected sha256 {pinned}, found {changed}'):
        MlipModel.from_file(model_file, expected_sha256=pinned)


def test_a_file_changed_in_the_repository_is_refused(aiida_profile, model_file):
    node = MlipModel.from_file(model_file).store()
    with node.open_verified() as path:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == node.sha256
    path = node.verified_path()
    assert node.verified_path() == path  # the verified copy is reused while it matches
    path.write_bytes(b'changed copy')  # a changed copy is replaced, not used
    assert hashlib.sha256(node.verified_path().read_bytes()).hexdigest() == node.sha256

    # Corrupt the stored object itself (the disk-objectstore keeps new objects as loose files named by their hash).
    container = node.backend.get_repository()._container  # noqa: SLF001
    loose = container._get_loose_path_from_hashkey(node.base.repository.get_object(MlipModel.FILENAME).key)  # noqa: SLF001
    original = open(loose, 'rb').read()
    try:
        with open(loose, 'r+b') as handle:
            handle.seek(len(original) // 2)
            handle.write(b'\xff' * 16)
        found = hashlib.sha256(open(loose, 'rb').read()).hexdigest()
        for use in (node.verify, node.verified_path, lambda: node.open_verified().__enter__(),
                    lambda: node.write_verified(model_file.parent / 'copy.model')):
            with pytest.raises(ModelIntegrityError, match=f'expected sha256 {node.sha256}, found {found}'):
                use()
        assert not (model_file.parent / 'copy.model').exists()  # a refused copy is not left behind
    finally:
        with open(loose, 'wb') as handle:
            handle.write(original)
    assert node.verify() == node.sha256


def test_foundation_offline_error_says_what_to_provide(tmp_path, monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError('fetch_foundation must not try the network when allow_download=False')

    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    with pytest.raises(FoundationModelUnavailable) as info:
        fetch_foundation('mace-mp-0b3-medium', cache_dir=tmp_path)
    message = str(info.value)
    entry = FOUNDATION_MODELS['mace-mp-0b3-medium']
    assert entry['url'] in message
    assert str(foundations.cache_path('mace-mp-0b3-medium', tmp_path)) in message
    assert 'aiida-mlip model import FILE --label mace-mp-0b3-medium' in message
    assert foundations.resolve_name('medium-0b3') == 'mace-mp-0b3-medium'  # mace-torch's own names work too
    with pytest.raises(ValueError, match='unknown foundation model `huge`'):
        fetch_foundation('huge', cache_dir=tmp_path)


def test_foundation_with_download_allowed_but_no_network(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError('Temporary failure in name resolution')

    monkeypatch.setattr(urllib.request, 'urlopen', unreachable)
    with pytest.raises(FoundationModelUnavailable, match='the download failed .*name resolution'):
        fetch_foundation('mace-mp-0-small', cache_dir=tmp_path, allow_download=True)
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_registry_urls_are_those_of_mace_torch():
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):
        from mace.calculators.foundations_models import mace_mp_urls
    for name, entry in FOUNDATION_MODELS.items():
        assert mace_mp_urls[entry['mace_name']] == entry['url'], name


def test_cached_foundation_is_used_and_pinned(trained, tmp_path, monkeypatch):
    """A copy of a locally trained model placed where the cache expects `mace-mp-0-small` is used offline."""
    monkeypatch.setenv('AIIDA_MLIP_CACHE', str(tmp_path))
    trained_model = trained[0]['model']
    expected = foundations.cache_path('mace-mp-0-small')
    assert expected.parent == tmp_path and expected.name == '20231210mace128L0_energy_epoch249model'  # mace's naming
    with trained_model.open_verified() as path:
        shutil.copy(path, expected)
    assert fetch_foundation('small') == expected
    pin = foundations.pin_path(expected)
    assert pin.is_file() and trained_model.sha256 in pin.read_text()

    node = foundations.load_foundation('mace-mp-0-small')
    assert node.pk == trained_model.pk  # the same file is not stored twice
    # A changed cached file is refused against the pin recorded on first use.
    with open(expected, 'ab') as handle:
        handle.write(b'\0')
    with pytest.raises(ModelIntegrityError, match=f'expected sha256 {trained_model.sha256}'):
        fetch_foundation('mace-mp-0-small')


def test_foundation_node_attributes(aiida_profile, tmp_path):
    write_untrained_mace(foundations.cache_path('mace-mp-0-medium', tmp_path), elements=('Si', 'Ge'), seed=7)
    node = foundations.load_foundation('medium', cache_dir=tmp_path)
    assert node.is_stored and node.origin == 'foundation'
    assert node.foundation_name == 'mace-mp-0-medium' and node.source == FOUNDATION_MODELS['mace-mp-0-medium']['url']


def test_cli_import_list_show(aiida_profile, model_file):
    from click.testing import CliRunner

    import aiida_mlip.cli.model  # noqa: F401  (registers the `model` group)
    from aiida_mlip.cli.root import cli

    runner = CliRunner()
    base = ['-p', aiida_profile.name, 'model']
    result = runner.invoke(cli, [*base, 'import', str(model_file), '--label', 'cli-si'])
    assert result.exit_code == 0, result.output
    assert 'imported: MlipModel<' in result.output
    again = runner.invoke(cli, [*base, 'import', str(model_file), '--label', 'cli-si-again'])
    assert again.exit_code == 0 and 'not imported again' in again.output
    listing = runner.invoke(cli, [*base, 'list', '--element', 'Si'])
    assert listing.exit_code == 0 and 'cli-si' in listing.output
    assert 'cli-si' not in runner.invoke(cli, [*base, 'list', '--element', 'Ge']).output
    show = runner.invoke(cli, [*base, 'show', 'cli-si', '--verify'])
    assert show.exit_code == 0, show.output
    assert 'r_max' in show.output and '3.5' in show.output and 'matches' in show.output
    bad = runner.invoke(cli, [*base, 'import', str(model_file), '--label', 'x', '--sha256', '0' * 64])
    assert bad.exit_code == 2 and 'expected sha256 ' + '0' * 64 in bad.output
    offline = runner.invoke(cli, [*base, 'fetch', 'mace-mp-0-large', '--cache-dir', str(model_file.parent)])
    assert offline.exit_code == 2 and 'aiida-mlip model import FILE --label mace-mp-0-large' in offline.output
