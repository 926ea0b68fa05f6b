"""Pure scientific analysis functions used by the aiida_mlip workflows.

Everything in this sub-package works on plain numbers and numpy arrays and has no
dependency on AiiDA or torch, so it can be unit-tested directly and reused outside
workflows. Submodules: :mod:`metrics` (error statistics, rank correlation, uncertainty
calibration), :mod:`eos` (Birch-Murnaghan equation of state), :mod:`elastic` (elastic
tensor from stress-strain data, Voigt-Reuss-Hill averages, Born stability),
:mod:`phonons` (imaginary-mode detection and band/DOS comparisons), :mod:`transferability`
(cross-class error matrices) and :mod:`md` (energy drift, distances, RDF, MD verdict).
"""
