"""The systemd units: they verify, carry every hardening directive, and agree
with the settings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imgworker import config

UNITS = Path(__file__).resolve().parent.parent / "systemd"
COMMON = {
    "User": "imgworker", "StateDirectory": "imgworker", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
    "PrivateTmp": "yes", "ProtectHome": "yes", "Restart": "on-failure", "KillMode": "mixed",
    "SystemCallFilter": None, "RestrictAddressFamilies": None, "MemoryMax": None, "MemoryHigh": None,
    "TimeoutStopSec": None, "RestartPreventExitStatus": None, "SystemCallArchitectures": "native",
}


def directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("unit", ["imgworker-api.service", "imgworker-worker.service"])
def test_hardening_directives_present(unit):
    d = directives(UNITS / unit)
    for key, want in COMMON.items():
        assert key in d, f"{unit} lacks {key}="
        if want is not None:
            assert d[key][-1] == want, (unit, key, d[key])
    assert "2" in d["RestartPreventExitStatus"][0].split()
    assert int(d["TimeoutStopSec"][0]) * 1000 > config.load({}, dotenv=None).shutdown_timeout_ms
    assert d["ExecStart"][0].endswith("imgworker " + ("api" if "api" in unit else "worker"))


def test_worker_unit_specifics():
    d = directives(UNITS / "imgworker-worker.service")
    assert d["OOMPolicy"] == ["continue"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX"]  # no network for the pool


def test_no_trailing_comments():
    for unit in UNITS.glob("*.service"):
        for line in unit.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                assert not re.search(r"\s[#;]", line.split("=", 1)[1]), f"{unit.name}: {line}"


def test_env_example_is_a_valid_configuration():
    values = config.parse_dotenv((UNITS / "imgworker.env.example").read_text())
    cfg = config.load(values, dotenv=None)
    assert cfg.env == "production"
    assert cfg.memory_pause_percent < 75  # below MemoryHigh (1536M of 2G)
    timeout_stop = int(directives(UNITS / "imgworker-worker.service")["TimeoutStopSec"][0])
    assert cfg.shutdown_timeout_ms < timeout_stop * 1000


def test_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: .ci/deps installs it")
    script = Path(sys.executable).with_name("imgworker")
    assert script.exists()
    for unit in UNITS.glob("imgworker*.*"):
        if unit.suffix in (".service", ".target"):
            (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/imgworker/venv/bin/imgworker", str(script)))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_cluster_drop_in_opens_the_database_and_the_mount():
    """systemd/cluster/cluster.conf (README, "Scaling out"): the worker unit is
    AF_UNIX-only without it; with it both units reach the database over IP,
    wait for the shared mount and keep received uploads on local disk."""
    d = directives(UNITS / "cluster" / "cluster.conf")
    families = d["RestrictAddressFamilies"][-1].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"]
    env = dict(v.split("=", 1) for v in d["Environment"])
    assert env["DATA_DIR"] in d["RequiresMountsFor"][-1] and env["DATA_DIR"] in d["ReadWritePaths"][-1]
    assert env["TMP_DIR"].startswith("/var/lib/imgworker/")  # the units' StateDirectory: local disk
    worker = directives(UNITS / "imgworker-worker.service")
    assert worker["RestrictAddressFamilies"][-1] == "AF_UNIX"  # why the drop-in is needed


def test_systemd_analyze_verify_with_cluster_drop_in(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: .ci/deps installs it")
    script = Path(sys.executable).with_name("imgworker")
    for unit in UNITS.glob("imgworker*.*"):
        if unit.suffix in (".service", ".target"):
            (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/imgworker/venv/bin/imgworker", str(script)))
            if unit.suffix == ".service":
                drop = tmp_path / f"{unit.name}.d"
                drop.mkdir()
                (drop / "cluster.conf").write_text((UNITS / "cluster" / "cluster.conf").read_text())
    units = sorted(str(p) for p in tmp_path.iterdir() if p.is_file())
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def _syscalls(name: str, seen: set[str] | None = None) -> set[str]:
    """The system calls a SystemCallFilter= item stands for (@groups expanded
    by systemd-analyze, recursively)."""
    if not name.startswith("@"):
        return {name}
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            calls |= _syscalls(item, seen)
    return calls


def allowed_syscalls(unit: str) -> set[str]:
    """What the unit's SystemCallFilter= lines allow, read as systemd does:
    the first line is an allow list; each later line adds to it, or with ~
    takes away from it."""
    lines = directives(UNITS / unit)["SystemCallFilter"]
    assert not lines[0].startswith("~")
    allowed: set[str] = set()
    for line in lines:
        deny = line.startswith("~")
        calls = set().union(*(_syscalls(item) for item in line.lstrip("~").split()))
        allowed = allowed - calls if deny else allowed | calls
    return allowed


def test_worker_unit_lets_a_worker_make_its_own_calls():
    """The pool's workers move themselves to SCHED_IDLE (sched_setscheduler,
    in @resources, which the unit otherwise denies: a denied call is SIGSYS)
    and cap their address space (Python's setrlimit is glibc's prlimit64)."""
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: .ci/deps installs it")
    allowed = allowed_syscalls("imgworker-worker.service")
    assert {"sched_setscheduler", "prlimit64", "socketpair", "sendmsg"} <= allowed
    # the rest of @resources stays denied (no affinity, priority or rlimit games)
    assert not {"setpriority", "sched_setaffinity", "sched_setattr", "setrlimit"} & allowed
    assert "sched_setscheduler" not in allowed_syscalls("imgworker-api.service")
