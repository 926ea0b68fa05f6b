"""AiiDA plugin and workflows for machine-learning interatomic potentials (MACE) labeled with Quantum ESPRESSO."""

__version__ = '0.1.0'
