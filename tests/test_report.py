"""HTML report: figure functions, escaping, the CLI, and the pages of real Training and Validation nodes (the shared
session fixtures) rendered in headless Chromium, which must load every image."""
import io
import os
import re
import subprocess
import time

import numpy as np
import pytest
from aiida import orm
from aiida.common.links import LinkType
from click.testing import CliRunner

from aiida_mlip.report import figures
from aiida_mlip.report.html import GENERATOR, escape, model_groups, table, write_report

from .fixtures_mlip import (  # noqa: F401  (fixtures)
    finetuned, mlip_codes, si_dataset, si_splits, trained, trained_committee, validated,
)

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
CHROMIUM = '/usr/bin/chromium'
#: Flags needed on a closed network (no first-run, sync, component or QUIC traffic) and as root in a container.
CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync')
#: Injected into a copy of the page: counts the images that decoded once the page has loaded.
IMAGE_CHECK = """<script>
window.addEventListener('load', function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) { loaded++; } }
  document.body.setAttribute('data-images-total', images.length);
  document.body.setAttribute('data-images-loaded', loaded);
});
</script>"""


def decoded_png(content: bytes) -> np.ndarray:
    """The pixels of a PNG (fails unless it decodes)."""
    from matplotlib.image import imread

    assert content[:8] == PNG_SIGNATURE
    return imread(io.BytesIO(content), format='png')


def render(index, tmp_path) -> dict:
    """Load ``index`` in headless Chromium; returns the images total/loaded and the rendered DOM."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get('CI'):
            pytest.fail('chromium is not installed: scripts/install.sh installs the Debian package chromium')
        pytest.skip('chromium not found: apt-get install chromium')
    page = index.read_text(encoding='utf-8')
    check = index.parent / '_render_check.html'  # next to index.html, so the relative image paths resolve
    check.write_text(page.replace('</body>', IMAGE_CHECK + '</body>'), encoding='utf-8')
    try:
        result = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f'--user-data-dir={tmp_path / "chromium-profile"}', '--dump-dom',
             '--virtual-time-budget=10000', check.as_uri()],
            capture_output=True, text=True, timeout=120, check=False)
    finally:
        check.unlink()
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r'data-images-total="(\d+)" data-images-loaded="(\d+)"', result.stdout)
    assert match, f'the page did not finish loading: {result.stdout[:500]}'
    return {'total': int(match.group(1)), 'loaded': int(match.group(2)), 'dom': result.stdout}


def check_page(index, tmp_path) -> dict:
    """Every image of the page is a PNG file next to it that Chromium decodes; no external URL, no script."""
    page = index.read_text(encoding='utf-8')
    assert f'<meta name="generator" content="{GENERATOR}">' in page
    assert '<script' not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    for source in sources:
        assert '/' not in source and ':' not in source, source
        decoded_png((index.parent / source).read_bytes())
    assert not re.findall(r'(?:src|href)="(?!#)[^"]*:', page), 'external URL in the page'
    assert sorted(sources) == sorted(path.name for path in index.parent.glob('*.png'))
    rendered = render(index, tmp_path)
    assert rendered['total'] == len(sources) and rendered['loaded'] == len(sources)
    return {'page': page, 'sources': sources, 'dom': rendered['dom']}


def section_titles(page: str) -> list[str]:
    return re.findall(r'<section id="[^"]+"><h2>([^<]+)</h2>', page)


# ---- figure functions and escaping (no AiiDA) -------------------------------------------------------------------
def test_figure_functions_give_png():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=60)
    histogram = figures.error_histogram(reference, reference + rng.normal(0, 0.1, 60), 'forces', 'meV/Å')
    parity = figures.parity(reference, reference + 0.1, 'forces', 'eV/Å')
    epochs = np.arange(-1, 6)
    curve = {'epoch': epochs, 'train_loss': np.r_[np.nan, np.exp(-epochs[1:])], 'valid_loss': np.exp(-epochs),
             'valid_rmse_f': np.linspace(300.0, 50.0, 7)}
    learning = figures.learning_curve({'member_0': curve, 'member_1': {**curve, 'valid_loss': 2 * curve['valid_loss']}})
    without_forces = figures.learning_curve({'m': {key: curve[key] for key in ('epoch', 'train_loss', 'valid_loss')}})
    for content in (histogram, parity, learning, without_forces):
        pixels = decoded_png(content)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0  # something was drawn
    assert decoded_png(learning).shape[1] > 1.5 * decoded_png(histogram).shape[1]  # two panels side by side


def test_text_is_escaped_and_values_formatted():
    hostile = '<script>alert("x")</script> & \'q\''
    html = table(['name', hostile], [[hostile, 1.234567, None, True, list(range(20)), [1, 2], {'a': 1, 'b<': 0.5},
                                      [[1, 2], [3, 4]]]])
    assert '<script>' not in html and '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;q&#x27;' in html
    assert '<td class="num">1.235</td>' in html and '<td>-</td>' in html and '<td>yes</td>' in html
    assert '[20 values]' in html and '[1, 2]' in html and '[2 values]' in html and '<td>a: 1, b&lt;: 0.5</td>' in html
    assert escape('a"b<c>') == 'a&quot;b&lt;c&gt;'


def test_model_groups():
    keys = ['finetuned_member_0', 'finetuned_member_1', 'scratch_member_0', 'zero_shot_member_0']
    assert model_groups(keys) == {'finetuned': [0, 1], 'scratch': [2], 'zero_shot': [3]}
    assert model_groups(['member_0', 'member_1']) == {'committee': [0, 1]}
    assert model_groups(['model']) == {'model': [0]}


# ---- a hand-made workflow node: escaping in the page and the CLI's refusals ----------------------------------------
def hand_made_workflow(label: str, summary: dict | None = None) -> orm.WorkflowNode:
    node = orm.WorkflowNode()
    node.label = label
    node.store()
    if summary is not None:
        output = orm.Dict(summary).store()
        output.base.links.add_incoming(node, link_type=LinkType.RETURN, link_label='summary')
    return node


def invoke(aiida_profile, *arguments):
    from aiida_mlip.cli import cli

    return CliRunner().invoke(cli, ['-p', aiida_profile.name, 'report', *map(str, arguments)])


def test_page_escapes_database_text(aiida_profile, tmp_path):
    hostile = '<img src=x onerror="alert(1)"> & co'
    node = hand_made_workflow(hostile, {hostile: 1.5, 'nested': {'n_labels': 12}})
    index = write_report(node, tmp_path / 'report')
    page = index.read_text(encoding='utf-8')
    assert '<img src=x' not in page and '&lt;img src=x onerror=&quot;alert(1)&quot;&gt; &amp; co' in page
    assert section_titles(page) == ['Overview', 'Summary', 'Provenance']
    assert '<td>nested.n_labels</td><td class="num">12</td>' in page
    assert f'<td class="num">{node.pk}</td><td>{node.uuid}</td>' in page  # in the table of nodes shown


def test_cli_refuses_bad_input(aiida_profile, tmp_path):
    missing = invoke(aiida_profile, 987654321, '-o', tmp_path / 'a')
    assert missing.exit_code == 2 and 'no node with pk or UUID `987654321`' in missing.output
    empty = hand_made_workflow('nothing here')
    nothing = invoke(aiida_profile, empty.pk, '-o', tmp_path / 'b')
    assert nothing.exit_code == 2 and 'has nothing to report' in nothing.output
    assert not (tmp_path / 'b').exists()  # refused before writing anything
    data = invoke(aiida_profile, orm.Int(1).store().pk, '-o', tmp_path / 'c')
    assert data.exit_code == 2 and 'is not a process node' in data.output

    busy = tmp_path / 'busy'
    busy.mkdir()
    (busy / 'notes.txt').write_text('mine')
    node = hand_made_workflow('ok', {'converged': True})
    refused = invoke(aiida_profile, node.pk, '-o', busy)
    assert refused.exit_code == 2 and 'not empty and holds no previous report' in refused.output
    forced = invoke(aiida_profile, node.pk, '-o', busy, '--force')
    assert forced.exit_code == 0, forced.output
    assert (busy / 'index.html').is_file() and (busy / 'notes.txt').read_text() == 'mine'
    again = invoke(aiida_profile, node.pk, '-o', busy)  # a previous report: overwritten without --force
    assert again.exit_code == 0 and f'WorkflowNode<{node.pk}>' in again.output


# ---- real nodes ------------------------------------------------------------------------------------------------
PW = 'aiida.calculations:quantumespresso.pw'


def pw_labeling_runs(dataset) -> int:
    return orm.QueryBuilder().append(orm.CalcJobNode, filters={
        'uuid': {'in': [u for u in dataset.source_uuids if u]}, 'process_type': PW}).count()


def test_training_report(aiida_profile, trained_committee, si_dataset, tmp_path):  # noqa: F811
    results, node = trained_committee
    assert node.is_finished_ok, node.exit_message
    start = time.perf_counter()
    result = invoke(aiida_profile, node.pk, '-o', tmp_path / 'training')
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    index = tmp_path / 'training' / 'index.html'
    shown = check_page(index, tmp_path)
    page = shown['page']
    assert section_titles(page) == ['Overview', 'Test-set errors', 'Parity plots and error histograms',
                                    'Learning curves', 'Provenance']
    # one evaluation of the committee on the test split: energy + force parity and a histogram; one learning curve
    assert len(shown['sources']) == 4
    assert sum('learning_curve' in source for source in shown['sources']) == 1
    metrics = results['test_metrics'].get_dict()
    assert f'{metrics["forces_mev_per_a"]["rmse"]:.4g}' in page
    labeled = pw_labeling_runs(si_dataset)
    assert labeled == 13  # 4 volumes, 8 rattled cells, the isolated atom
    assert ('<td>pw.x runs that labeled the frames of the datasets shown (their source_uuids)</td>'
            f'<td class="num">{labeled}</td>') in page
    assert '<td>pw.x runs called by this workflow (labeling and DFT references)</td><td class="num">0</td>' in page
    assert si_dataset.base.attributes.get('fingerprint_hash') in page and '<td>PBE-test</td>' in page
    for model in results['models'].values():
        assert model.sha256 in page and f'<td class="num">{model.pk}</td><td>{model.uuid}</td>' in page
    assert 'Test-set errors' in shown['dom']
    sizes = {path.name: path.stat().st_size for path in index.parent.iterdir()}
    print(f'\ntraining report: {seconds:.1f} s, sizes {sizes}')

    # the same folder holds a previous report: a report of another node replaces it, old figures included
    other = hand_made_workflow('summary only', {'n_labels': 13})
    assert invoke(aiida_profile, other.pk, '-o', tmp_path / 'training').exit_code == 0
    assert not list((tmp_path / 'training').glob('*.png'))


def test_validation_report(aiida_profile, validated, trained, tmp_path):  # noqa: F811
    results, node = validated
    assert node.is_finished_ok, node.exit_message
    start = time.perf_counter()
    index = write_report(node, tmp_path / 'validation')
    seconds = time.perf_counter() - start
    shown = check_page(index, tmp_path)
    page = shown['page']
    assert section_titles(page) == ['Overview', 'Validation against DFT', 'Provenance']
    assert sorted(re.sub(r'^\d+_this_node_', '', s) for s in shown['sources']) == \
        ['cij_parity.png', 'eos_overlay.png', 'phonon_bands.png']
    for name, figure in results['figures'].items():  # copied byte for byte from the figures output
        with figure.open(mode='rb') as handle:
            source = next(s for s in shown['sources'] if s.endswith(f'_{name}.png'))
            assert (index.parent / source).read_bytes() == handle.read()
    verdict = results['comparison']['verdict']
    assert ('PASSED' if verdict['passed'] else 'FAILED') in page
    for reason in verdict['failed']:
        assert escape(reason) in page
    dft = np.array(results['dft']['elastic']['elastic_tensor_gpa'])
    mlip = np.array(results['mlip']['elastic']['elastic_tensor_gpa'])
    assert f'<td>{dft[0, 0]:.1f} / {mlip[0, 0]:.1f}</td>' in page  # the Cij table
    dft_runs = sum(1 for p in node.called_descendants if p.process_type == PW)
    assert dft_runs > 0
    assert f'<td>pw.x runs called by this workflow (labeling and DFT references)</td><td class="num">{dft_runs}</td>' \
        in page
    # the model's training set (found through the model's creator) and the pw.x runs behind it
    train = trained[0]['model'].creator.inputs.train
    assert f'<td>training set of input mlip.models.model</td><td>TrainingSet&lt;{train.pk}&gt;</td>' in page
    assert trained[0]['model'].sha256 in page
    print(f'\nvalidation report: {seconds:.1f} s, sizes '
          f'{ {path.name: path.stat().st_size for path in index.parent.iterdir()} }')


def test_finetune_report(aiida_profile, finetuned, tmp_path):  # noqa: F811
    _, results, node = finetuned
    assert node.is_finished_ok, node.exit_message
    start = time.perf_counter()
    index = write_report(node, tmp_path / 'finetune')
    seconds = time.perf_counter() - start
    shown = check_page(index, tmp_path)
    page = shown['page']
    assert section_titles(page) == ['Overview', 'Summary', 'Parity plots and error histograms', 'Learning curves',
                                    'Validation against DFT', 'Provenance']
    # ONE evaluation of the three model groups on the same test split: 3 figures each
    for group in ('finetuned', 'scratch', 'zero_shot'):
        assert sum(f'_evaluate_test_{group}_' in source for source in shown['sources']) == 3
    assert sum('learning_curve' in source for source in shown['sources']) == 2  # fine-tuning and from scratch
    for label in ('validate_zero_shot', 'validate_iteration_01', 'validate_scratch'):
        assert f'<h3>{label}: ValidationWorkChain&lt;' in page
    ratio = results['comparison']['forces_rmse_ratio_finetuned_to_zero_shot']
    assert f'<td>forces_rmse_ratio_finetuned_to_zero_shot</td><td class="num">{ratio:.4g}</td>' in page
    assert results['model'].sha256 in page and results['dataset'].uuid in page
    print(f'\nfinetune report: {seconds:.1f} s, {len(shown["sources"])} figures, '
          f'{sum(p.stat().st_size for p in index.parent.iterdir())} bytes')


def check_report_of(node, tmp_path, sections: set) -> None:
    """The report of a finished workflow that another module's fixture ran (test_active_learning.py,
    test_campaign.py): made without new compute, with ``sections`` and the stage sections its outputs call for."""
    start = time.perf_counter()
    index = write_report(node, tmp_path / 'report')
    seconds = time.perf_counter() - start
    shown = check_page(index, tmp_path)
    titles = set(section_titles(shown['page']))
    assert sections <= titles
    if 'test_metrics' in node.outputs:  # a campaign whose training scored the test split
        assert {'Test-set errors', 'Parity plots and error histograms'} <= titles
    if 'transferability' in node.outputs:  # a campaign with its transferability stage
        assert 'Transferability' in titles
    print(f'\n{node.process_label} report: {seconds:.1f} s, {len(shown["sources"])} figures, '
          f'{sum(p.stat().st_size for p in index.parent.iterdir())} bytes')
