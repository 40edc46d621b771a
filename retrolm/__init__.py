"""retrolm: RETRO, the Retrieval-Enhanced Transformer (Borgeaud et al. 2021), as a library.

The public names are imported lazily so that `retrolm --help` and the database tools do not pay
for importing torch, faiss or sentence-transformers until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "RetroConfig": "retrolm.config",
    "RETRO": "retrolm.model",
    "Database": "retrolm.database",
    "UserError": "retrolm.errors",
    "retrofit_hf": "retrolm.hf",
    "RetroFitted": "retrolm.hf",
}

__all__ = [
    "RETRO",
    "Database",
    "RetroConfig",
    "RetroFitted",
    "UserError",
    "__version__",
    "retrofit_hf",
]

if TYPE_CHECKING:  # pragma: no cover
    from retrolm.config import RetroConfig
    from retrolm.database import Database
    from retrolm.errors import UserError
    from retrolm.hf import RetroFitted, retrofit_hf
    from retrolm.model import RETRO


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrolm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
