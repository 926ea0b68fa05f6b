"""Campaign files: YAML definitions of labeling -> training -> validation -> transferability runs."""
