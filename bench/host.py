"""What this host offers, read from the OS without torch: cache sizes (sysfs) and free memory."""

from __future__ import annotations

import functools
from pathlib import Path

CACHE_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")
# Where sysfs says nothing: the largest LLC reported on the project's machines (480 MiB).
FALLBACK_LLC_BYTES = 480 << 20


def _size_bytes(text: str) -> int:
    """A sysfs cache size such as "32768K" in bytes."""
    text = text.strip()
    multiplier = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text.rstrip("KMGkmg")) * multiplier


def _data_caches(sysfs: Path) -> list[tuple[int, int]]:
    """(level, bytes) of every data or unified cache of cpu0 that sysfs describes."""
    caches = []
    for index in sorted(Path(sysfs).glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            caches.append((int((index / "level").read_text().strip()),
                           _size_bytes((index / "size").read_text())))
        except (OSError, ValueError):
            continue
    return caches


def cache_sizes(sysfs: Path = CACHE_SYSFS) -> dict[str, int]:
    """Data/unified cache sizes in bytes by level ("l1d_bytes", "l2_bytes", ...); {} if unknown."""
    return {f"l{level}{'d' if level == 1 else ''}_bytes": size
            for level, size in _data_caches(sysfs)}


@functools.lru_cache(maxsize=4)
def last_level_cache(sysfs: Path = CACHE_SYSFS) -> tuple[int, str]:
    """(bytes, source) of the highest-level data or unified cache, or the fallback."""
    caches = [cache for cache in _data_caches(sysfs) if cache[1] > 0]
    if not caches:
        return FALLBACK_LLC_BYTES, "fallback"
    level, size = max(caches)
    return size, f"sysfs L{level}"


def available_memory_bytes() -> int:
    """Memory that a new allocation can use without swapping."""
    import psutil

    return int(psutil.virtual_memory().available)


THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages(sysfs: Path = THP_SYSFS) -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or "unknown"."""
    try:
        text = Path(sysfs).read_text()
    except OSError:
        return "unknown"
    # sysfs brackets the active choice: "always [madvise] never".
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unknown"


def huge_page_bytes(address: int, smaps: Path = Path("/proc/self/smaps")) -> int:
    """Bytes of the mapping that holds an address which the kernel backs by huge pages."""
    inside = False
    try:
        lines = Path(smaps).read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            # A mapping's header line: "start-end perms offset dev inode [path]".
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[:1] == ["AnonHugePages:"]:
            return int(fields[1]) << 10
    return 0
