"""The production stack's packages beside torch (FBGEMM, torchrec): import them or say how to."""

from __future__ import annotations

import importlib
from types import ModuleType

from bench.registry import Unsupported

# One command installs every peer at versions that load beside torch 2.13.0 (see README):
# torchrec 1.8.0 must come without its dependencies, or pip pulls fbgemm-gpu's CUDA build.
PEERS_INSTALL = ("pip install -e '.[peers]' && pip install --no-deps torchrec==1.8.0")


def require(module: str) -> ModuleType:
    """Import a peer module, or raise Unsupported (a skip row) naming the install command."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or a wheel built for another torch (OSError)
        raise Unsupported(f"{module} is not available ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else 'no detail'}); "
                          f"install the peers with: {PEERS_INSTALL}") from None
