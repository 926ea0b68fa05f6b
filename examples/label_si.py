"""Main job until campaigns land: sample Si cells, label them with pw.x, print the dataset and its provenance.

Run after `aiida-mlip setup` (README's first command does both):
    AIIDA_PATH=$PWD/.aiida .venv/bin/python examples/label_si.py [--protocol fast]
"""
import argparse
import time

from aiida import engine, load_profile, orm
from ase.build import bulk

from aiida_mlip.calculations.sampling import rattle_structure, scale_volume
from aiida_mlip.workflows.labeling import DftLabelingWorkChain

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument('--protocol', default='fast', help='labeling protocol: fast, balanced or stringent')
parser.add_argument('--pseudo-family', default='PBE-QE-local')
parser.add_argument('--code', default='pw@localhost')
parser.add_argument('--kpoints-distance', type=float, default=0.4, help='k-point spacing in 1/Å')
args = parser.parse_args()

load_profile()
primitive = orm.StructureData(ase=bulk('Si', 'diamond', a=5.43))
conventional = orm.StructureData(ase=bulk('Si', 'diamond', a=5.43, cubic=True))

# Seeded sampling calcfunctions: every candidate cell has a creator in the graph.
volumes = scale_volume(primitive, orm.List([-0.06, -0.03, 0.0, 0.03, 0.06]))
rattled = rattle_structure(conventional, orm.Float(0.05), orm.Int(3), orm.Int(42))
structures = {f'si2_volume_{i}': s for i, s in enumerate(volumes.values())}
structures.update({f'si8_rattle_{i}': s for i, s in enumerate(rattled.values())})
config_types = {key: 'volume' if 'volume' in key else 'rattle' for key in structures}

builder = DftLabelingWorkChain.get_builder_from_protocol(
    args.code, structures, protocol=args.protocol, pseudo_family=args.pseudo_family,
    overrides={'isolated_atoms': True, 'pw_base': {'kpoints_distance': args.kpoints_distance}},
    config_types=config_types,
)
start = time.time()
results, node = engine.run_get_node(builder)
elapsed = time.time() - start
print(f'DftLabelingWorkChain<{node.pk}> {node.process_state.value}, exit status {node.exit_status} in {elapsed:.0f} s')
report = results['quality_report'].get_dict()
print(f'accepted {report["n_accepted"]}/{report["n_frames"]} frames; dropped: {report["dropped"] or "none"}')
dataset = results['dataset']
print(f'dataset mlip.dataset<{dataset.pk}>: {dataset.n_frames} frames, elements {dataset.elements}, '
      f'config types {dataset.config_types}')
settings = {key: dataset.fingerprint[key] for key in ('functional', 'ecutwfc', 'ecutrho', 'kpoints_distance', 'smearing')}
print(f'DFT settings (fingerprint {dataset.base.attributes.get("fingerprint_hash")}): {settings}')
for frame, uuid in zip(dataset.to_ase(), dataset.source_uuids):
    calculation = orm.load_node(uuid)
    print(f'  {frame.info["config_type"]:<13} {len(frame):>2} atoms  E = {frame.info["REF_energy"]:12.5f} eV'
          f'  <- PwCalculation<{calculation.pk}>')
print(f'inspect: verdi process status {node.pk} ; verdi node show {dataset.pk}')
