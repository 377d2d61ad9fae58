"""The production stack's packages beside torch (FBGEMM, torchrec): import them or say how to."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Optional

from bench.registry import Unsupported

# One command installs every peer at versions that load beside torch 2.13.0 (see README):
# torchrec 1.8.0 must come without its dependencies, or pip pulls fbgemm-gpu's CUDA build.
PEERS_INSTALL = ("pip install -e '.[peers]' && pip install --no-deps torchrec==1.8.0")
# Where FBGEMM publishes which of its releases pairs with which torch and CUDA.
FBGEMM_RELEASES = "https://docs.pytorch.org/FBGEMM/general/Releases.html"
# fbgemm_gpu's build variants whose TBE kernels run on a torch "cuda" device (ROCm's torch
# names its GPUs cuda too); "cpu" builds register CPU kernels only.
GPU_BUILDS = ("cuda", "rocm")


def require(module: str) -> ModuleType:
    """Import a peer module, or raise Unsupported (a skip row) naming the install command."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or a wheel built for another torch (OSError)
        raise Unsupported(f"{module} is not available ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else 'no detail'}); "
                          f"install the peers with: {PEERS_INSTALL}") from None


def fbgemm_build() -> str:
    """The build variant the installed fbgemm_gpu records ("cpu", "cuda", "rocm", ...), ""
    when none is installed, "unknown" when it records none; reads its target file, imports
    nothing (loading its libraries takes seconds, too long for every planned configuration)."""
    spec = importlib.util.find_spec("fbgemm_gpu")
    if spec is None:
        return ""
    for location in spec.submodule_search_locations or []:
        try:
            target = json.loads(Path(location, "docs", "target.default.json.py").read_text())
            return str(target["variant"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "unknown"


def fbgemm_release(torch_version: str) -> Optional[str]:
    """The fbgemm-gpu release that pairs with a torch version, by FBGEMM's compatibility table
    (FBGEMM 1.N with torch 2.(N + 5), from 1.0 with 2.5 on); None before that."""
    found = re.match(r"(\d+)\.(\d+)", torch_version)
    if not found or int(found[1]) != 2 or int(found[2]) < 5:
        return None
    return f"1.{int(found[2]) - 5}.0"


def cuda_peers_install(torch_version: str, cuda_version: Optional[str]) -> str:
    """The commands that replace the CPU build of fbgemm_gpu by its CUDA build paired with
    this torch, and add torchrec of the same release without its dependencies (a plain
    install would replace torch)."""
    release = fbgemm_release(torch_version)
    channel = f"cu{cuda_version.replace('.', '')}" if cuda_version else "cu<your CUDA>"
    if release is None:
        return (f"pip install fbgemm-gpu==<the release {FBGEMM_RELEASES} pairs with torch "
                f"{torch_version}> --index-url https://download.pytorch.org/whl/{channel}")
    return (f"pip uninstall -y fbgemm-gpu-cpu; pip install --no-deps fbgemm-gpu=={release} "
            f"--index-url https://download.pytorch.org/whl/{channel} && "
            f"pip install --no-deps torchrec=={release} (torchrec also needs tensordict, "
            f"torchmetrics and pyre-extensions)")


def cuda_peer_reason(modules: tuple[str, ...], torch_version: str,
                     cuda_version: Optional[str]) -> str:
    """Plan-time: why peer impls that need these modules cannot run on a cuda device here
    (fbgemm_gpu absent or its CPU build, a module absent), naming the install; '' if they may."""
    install = cuda_peers_install(torch_version, cuda_version)
    build = fbgemm_build()
    if not build:
        return f"fbgemm_gpu is not installed; on cuda it needs FBGEMM's CUDA build: {install}"
    if build not in GPU_BUILDS and build != "unknown":
        return (f"fbgemm_gpu here is its {build} build, whose TBE kernels run on CPU only; on "
                f"cuda install its CUDA build: {install}")
    for module in modules:
        if module != "fbgemm_gpu" and importlib.util.find_spec(module) is None:
            return f"{module} is not installed; install it with: {install}"
    return ""
