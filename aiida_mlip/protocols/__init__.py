"""YAML protocols (fast / balanced / stringent) in the pattern of aiida-quantumespresso's ``ProtocolMixin``."""
import functools
import pathlib

import yaml

from aiida_quantumespresso.workflows.protocols.utils import ProtocolMixin as _QeProtocolMixin

PROTOCOL_DIR = pathlib.Path(__file__).parent


class ProtocolMixin(_QeProtocolMixin):
    """Reads ``aiida_mlip/protocols/<_protocol_name>.yaml``."""

    _protocol_name: str

    @classmethod
    def get_protocol_filepath(cls) -> pathlib.Path:
        return PROTOCOL_DIR / f'{cls._protocol_name}.yaml'


@functools.lru_cache(maxsize=None)
def protocol_file(workflow: str) -> dict:
    """The parsed ``aiida_mlip/protocols/<workflow>.yaml`` (read once): the one source of the defaults."""
    return yaml.safe_load((PROTOCOL_DIR / f'{workflow}.yaml').read_text(encoding='utf-8'))


def validation_threshold_names() -> tuple[str, ...]:
    """The validation thresholds there are: those of the validation protocol's defaults."""
    return tuple(protocol_file('validation')['default_inputs']['thresholds'])
