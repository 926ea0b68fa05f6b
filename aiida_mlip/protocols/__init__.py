"""YAML protocols (fast / balanced / stringent) in the pattern of aiida-quantumespresso's ``ProtocolMixin``."""
import pathlib

from aiida_quantumespresso.workflows.protocols.utils import ProtocolMixin as _QeProtocolMixin

PROTOCOL_DIR = pathlib.Path(__file__).parent


class ProtocolMixin(_QeProtocolMixin):
    """Reads ``aiida_mlip/protocols/<_protocol_name>.yaml``."""

    _protocol_name: str

    @classmethod
    def get_protocol_filepath(cls) -> pathlib.Path:
        return PROTOCOL_DIR / f'{cls._protocol_name}.yaml'
