"""The benchmarks' throw-away folder: it is also the AIIDA_PATH, so no profile or config lands in the user's home."""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile


@contextlib.contextmanager
def scratch_folder(prefix: str = 'aiida-mlip-bench-', keep: bool = False):
    """A temporary folder set as ``AIIDA_PATH``, removed afterwards unless ``keep``.

    Enter it before aiida is first imported: aiida-core reads AIIDA_PATH once and creates ``~/.aiida`` otherwise.
    """
    root = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    previous = os.environ.get('AIIDA_PATH')
    os.environ['AIIDA_PATH'] = str(root)
    try:
        yield root
    finally:
        if previous is None:
            os.environ.pop('AIIDA_PATH', None)
        else:
            os.environ['AIIDA_PATH'] = previous
        if keep:
            print(f'kept {root}')
        else:
            shutil.rmtree(root, ignore_errors=True)
