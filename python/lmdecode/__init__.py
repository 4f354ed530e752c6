"""lmdecode: autoregressive language-model inference with a C core."""
from . import _core

__version__ = "0.1.0"


def build_info() -> dict:
    """How the C core was built: OpenMP on/off, vector extensions, thread count."""
    info = _core.build_info()
    info["vector_extensions"] = info["vector_extensions"].split()
    return info


def set_num_threads(n: int) -> None:
    """Threads used by the C core's parallel loops; 0 restores the default."""
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.get_num_threads()

from .model import KVCache, Model, ModelConfig  # noqa: E402  (the engine, issue 3)
