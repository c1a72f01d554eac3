"""Memory use as the supervisor sees it before each claim.

Two readings, the higher one wins: the host's (psutil), and the service's own
cgroup against its limit when one is set (systemd ``MemoryMax=``), because a
service capped at 2 GiB on a 24 GiB host is in trouble long before the host
is. The cgroup figure excludes inactive file cache, which the kernel reclaims
before it would OOM-kill us (the same "working set" that container runtimes use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup_dirs() -> list[Path]:
    """Our cgroup v2 directory and its ancestors, innermost first."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                rel = line[3:].strip().lstrip("/")
                path = _CGROUP_ROOT / rel
                dirs = []
                while True:
                    dirs.append(path)
                    if path == _CGROUP_ROOT or path.parent == path:
                        break
                    path = path.parent
                return dirs
    except OSError:
        pass
    return []


class MemoryProbe:
    """Reads memory pressure; cheap enough to call before every claim."""

    def __init__(self) -> None:
        self._limited: tuple[Path, int] | None = None
        for d in _own_cgroup_dirs():
            try:
                raw = (d / "memory.max").read_text().strip()
            except OSError:
                continue
            if raw != "max":
                self._limited = (d, int(raw))
                break

    def read(self) -> dict[str, Any]:
        """{'percent': highest use in %, 'source': 'host'|'cgroup', and the figures}."""
        vm = psutil.virtual_memory()
        out: dict[str, Any] = {"percent": round(vm.percent, 1), "source": "host",
                               "hostPercent": round(vm.percent, 1), "hostAvailableMb": vm.available // 2**20}
        if self._limited:
            d, limit = self._limited
            try:
                current = int((d / "memory.current").read_text())
                inactive = 0
                for line in (d / "memory.stat").read_text().splitlines():
                    if line.startswith("inactive_file "):
                        inactive = int(line.split()[1])
                        break
                used = max(0, current - inactive)
                pct = round(used * 100 / limit, 1)
                out.update(cgroupPercent=pct, cgroupUsedMb=used // 2**20, cgroupLimitMb=limit // 2**20)
                if pct > out["percent"]:
                    out["percent"], out["source"] = pct, "cgroup"
            except (OSError, ValueError):
                pass
        return out
