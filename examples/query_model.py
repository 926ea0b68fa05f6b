"""Where a model comes from: its datasets, the pw.x runs behind its frames, its foundations and its validations.

Run on any profile with a trained model (e.g. after the test suite's fixtures or a campaign):
    AIIDA_PATH=$PWD/.aiida .venv/bin/python examples/query_model.py MODEL_PK_OR_UUID
    AIIDA_PATH=$PWD/.aiida .venv/bin/python examples/query_model.py --elements Si,Ge   # models covering Si and Ge
"""
import argparse
import collections

from aiida import load_profile

from aiida_mlip.query import lineage, models_covering, validation_results

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument('model', nargs='?', help='pk or UUID of an mlip.model node')
parser.add_argument('--elements', help='list the models covering these comma-separated elements instead')
args = parser.parse_args()
if not args.model and not args.elements:
    parser.error('give MODEL or --elements')

load_profile()
if args.elements:
    for record in models_covering(args.elements):
        print(f'{record.pk:>6}  {record.origin:<10} {",".join(record.elements):<12} {record.label}')
    raise SystemExit

result = lineage(args.model)
print(f'model {result.model.pk}: {",".join(result.model.elements)}, origin {result.model.origin}')
for dataset in result.datasets:
    print(f'  dataset {dataset.pk} {",".join(dataset.roles) or "source":<8} {dataset.n_frames:>4} frames, '
          f'made by {dataset.creator}')

# The DFT settings behind the frames: one line per distinct (family, cutoffs, k-mesh) -- one line means one DFT.
settings = collections.Counter(
    (",".join(pw.pseudo_families), pw.ecutwfc, pw.ecutrho, "x".join(map(str, pw.kpoints_mesh or [])))
    for pw in result.pw_calculations)
print(f'  {len(result.pw_calculations)} PwCalculations:')
for (family, ecutwfc, ecutrho, mesh), count in settings.items():
    print(f'    {count:>4} x family {family}, ecutwfc {ecutwfc} / ecutrho {ecutrho} Ry, k-mesh {mesh}')
failed = [pw.pk for pw in result.pw_calculations if pw.exit_status != 0]
print(f'    not finished ok: {failed or "none"}')

chain = ' -> '.join(str(foundation.pk) for foundation in result.foundations)
print(f'  foundation chain: {chain or "none (trained from scratch)"}')
for record in validation_results(args.model):
    verdict = {True: 'PASSED', False: 'FAILED', None: 'no verdict'}[record.passed]
    print(f'  ValidationWorkChain<{record.process.pk}> on {record.structure_formula} '
          f'({",".join(record.properties)}): {verdict} {"; ".join(record.failed)}')
