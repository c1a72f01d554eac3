"""Settings: one declarative table, read once at start, validated once.

Every key of the original Node.js service keeps its name, unit and default
(SPEC §3); the keys this service adds follow. Values come from the process
environment and from a ``.env`` file in the working directory; the real
environment wins, so an operator can override a checked-in ``.env``.

A bad value raises :class:`ConfigError` naming the key and the value; the CLI
turns it into exit code 2 so systemd does not restart-loop on it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from . import formats as formats_mod

FORMATS = formats_mod.READABLE  # input formats whose decoder this install has
OUTPUT_FORMATS = formats_mod.OUTPUT_CHOICES  # webp jpeg png [avif] original auto
ENVIRONMENTS = ("development", "production", "test")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
SCHEDULING = ("idle", "batch", "normal")  # worker CPU policy: SCHED_IDLE, SCHED_BATCH, SCHED_OTHER


class ConfigError(ValueError):
    """A setting has a value we refuse; the message names key and value."""


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        try:
            value = int(raw.strip().replace("_", ""))
        except ValueError:
            raise ValueError("not a whole number") from None
        if lo is not None and value < lo:
            raise ValueError(f"must be at least {lo}")
        if hi is not None and value > hi:
            raise ValueError(f"must be at most {hi}")
        return value

    return convert


def _float(lo: float, hi: float | None = None) -> Callable[[str], float]:
    def convert(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError("not a number") from None
        if value != value or value < lo or (hi is not None and value > hi):
            raise ValueError(f"must be between {lo} and {hi}" if hi is not None else f"must be at least {lo}")
        return value

    return convert


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return convert


def _formats(raw: str) -> tuple[str, ...]:
    names = [part.strip().lower() for part in raw.split(",") if part.strip()]
    names = ["jpeg" if n == "jpg" else n for n in names]
    names = ["heic" if n in ("heif", "hif") else n for n in names]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        if unknown[0] in formats_mod.MISSING_HINT:
            raise ValueError(f"{unknown[0]!r} is not available: {formats_mod.MISSING_HINT[unknown[0]]}")
        raise ValueError(f"unknown format {unknown[0]!r} (known: {', '.join(FORMATS)})")
    if not names:
        raise ValueError("needs at least one format")
    return tuple(dict.fromkeys(names))


def _origins(raw: str) -> tuple[str, ...]:
    origins = []
    for part in raw.split(","):
        origin = part.strip().rstrip("/")
        if not origin:
            continue
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"{origin!r} is not an origin like https://example.com")
        origins.append(origin)
    return tuple(origins)


def _output_format(raw: str) -> str:
    value = {"jpg": "jpeg"}.get(raw.strip().lower(), raw.strip().lower())
    if value == "avif" and value not in OUTPUT_FORMATS:
        raise ValueError(formats_mod.MISSING_HINT["avif"])
    return _choice(OUTPUT_FORMATS)(value)


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _text(raw: str) -> str:
    return raw.strip()


_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/\s]*@")


def mask_password(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` URL in it
    replaced by ``***`` (for error messages and logs)."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def _database_url(raw: str) -> str:
    """Empty (the embedded SQLite store) or a ``postgresql://`` URL."""
    from urllib.parse import urlsplit

    value = raw.strip()
    if not value:
        return ""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql:// URL (like postgresql://HOST:PORT/DATABASE) or empty for SQLite")
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise ValueError("names no database: postgresql://HOST/DATABASE")
    return value


# (name, converter, default, doc). Defaults are strings so that they go
# through the same converter as operator input: one path, validated once.
SETTINGS: tuple[tuple[str, Callable[[str], Any], str, str], ...] = (
    # --- keys of the original service (same names, units, defaults) ---
    ("PORT", _int(0, 65535), "3001", "HTTP port of the API"),
    ("MAX_CONCURRENT_JOBS", _int(1, 64), "3", "worker processes; each runs one job at a time"),
    ("JOB_TIMEOUT_MS", _int(10), "30000", "a job running longer has its worker killed and is retried"),
    ("MAX_QUEUE_SIZE", _int(1), "100", "bound on queued + retrying jobs; more gets 503 QUEUE_FULL"),
    ("CLEANUP_INTERVAL_MS", _int(100), "60000", "how often expired jobs, their files and orphan temp files go"),
    ("MAX_FILE_SIZE_MB", _float(0.001), "50", "largest accepted upload, per file"),
    ("MAX_IMAGE_WIDTH", _int(1, 65535), "1024", "outputs fit within this width"),
    ("MAX_IMAGE_HEIGHT", _int(1, 65535), "1024", "outputs fit within this height"),
    ("COMPRESSION_QUALITY", _float(0.1, 1.0), "0.8", "default encoder quality, 0.1-1.0"),
    ("SUPPORTED_FORMATS", _formats, "jpeg,png,webp,gif",
     "input formats accepted (by content); add avif, heic (needs imgworker[heif]) to take them"),
    ("RATE_LIMIT_WINDOW_MS", _int(1), "900000", "rate-limit window for work-creating requests"),
    ("RATE_LIMIT_MAX_REQUESTS", _int(1), "100", "work-creating requests per IP per window"),
    ("CORS_ORIGINS", _origins, "", "comma-separated origins allowed to call the API from a browser"),
    ("NODE_ENV", _choice(ENVIRONMENTS), "development", "environment name (APP_ENV wins when set)"),
    # --- keys this service adds ---
    ("APP_ENV", _choice(ENVIRONMENTS + ("",)), "", "environment name: development, production or test"),
    ("HOST", _text, "127.0.0.1", "address the API listens on"),
    ("DATA_DIR", _text, "./data", "uploads, processed images, temp files and the database"),
    ("NODE_NAME", _text, "", "name this node registers under (default: the host name); nodes judge each other "
     "by pid only under the same name, otherwise by heartbeat and lease"),
    ("TMP_DIR", _text, "", "uploads being received (default: $DATA_DIR/tmp); with a shared DATA_DIR, "
     "a directory on the node's local disk"),
    ("DATABASE_PATH", _text, "", "SQLite file (default: $DATA_DIR/imgworker.db)"),
    ("DATABASE_URL", _database_url, "", "`postgresql://user:password@host/db` selects the PostgreSQL store "
     "(several nodes; see Scaling out); empty: SQLite at DATABASE_PATH"),
    ("MAX_RETRIES", _int(0, 100), "3", "retries of a transient failure before the job fails"),
    ("RETRY_BASE_DELAY_MS", _int(0), "1000", "first retry delay; doubles each attempt"),
    ("RETRY_MAX_DELAY_MS", _int(0), "60000", "cap on the retry delay"),
    ("JOB_RETENTION_MS", _int(1000), "86400000", "finished jobs and their files are kept this long"),
    ("MAX_INPUT_PIXELS", _int(1), "50000000", "width x height above which an upload is refused"),
    ("MAX_FRAMES", _int(1), "1000", "frame count above which an animation is refused"),
    ("MAX_ANIMATION_PIXELS", _int(1), "500000000", "frames x canvas pixels above which an animation is refused"),
    ("MAX_JPEG_SCANS", _int(1, 100000), "100", "a JPEG with more scans is refused before decoding (each progressive scan is a pass over the whole image; encoders write 10 to 20)"),
    ("BATCH_MAX_FILES", _int(1, 1000), "20", "files per batch request"),
    ("OUTPUT_FORMAT", _output_format, "webp",
     "default output format: webp, jpeg, png, avif, original, or auto (picked per upload from the Accept header)"),
    ("AVIF_SPEED", _int(0, 10), "6", "AVIF encoder speed 0-10: lower is smaller and slower (see README, Formats)"),
    ("MEMORY_PAUSE_PERCENT", _float(0, 100), "90", "stop claiming jobs at or above this memory use"),
    ("MEMORY_RESUME_PERCENT", _float(0, 100), "80", "resume claiming below this memory use"),
    ("WORKER_MAX_RSS_MB", _int(16), "1024", "a worker above this RSS after a job is replaced; its address space is capped at 2x"),
    ("WORKER_SCHEDULING", _choice(SCHEDULING), "idle",
     "CPU scheduling policy of the workers (Linux): idle (they get only CPU time nothing else wants, so the API "
     "answers at once while they fill the cores), batch or normal (README, Jobs)"),
    ("SHUTDOWN_TIMEOUT_MS", _int(0), "30000", "graceful-stop budget for running jobs"),
    ("TRUST_PROXY", _bool, "false", "take the client IP from X-Forwarded-For (only behind a proxy)"),
    ("LOG_LEVEL", _choice(LOG_LEVELS), "info", "debug, info, warning or error"),
    ("LOG_FORMAT", _choice(LOG_FORMATS), "text", "text (one line per event) or json (one object per line)"),
    # --- the HTTP edge: one client must not take the API down (README, "Hostile clients") ---
    ("MAX_CONNECTIONS", _int(16, 100000), "1000",
     "open connections the API holds; at the limit the longest-idle one not being answered is closed for a new one"),
    ("MAX_CONNECTIONS_PER_CLIENT", _int(1, 100000), "32",
     "open connections per client address; more are answered 503 and closed (not applied with TRUST_PROXY)"),
    ("HEADER_TIMEOUT_MS", _int(100), "10000",
     "a request's headers must arrive within this (408 otherwise); also how long an idle connection stays open"),
    ("BODY_MIN_BYTES_PER_S", _int(1), "8192",
     "a request body arriving slower than this on average (after HEADER_TIMEOUT_MS) is cut off with 408"),
    ("MIN_FREE_DISK_MB", _int(0), "256",
     "uploads get 507 with Retry-After while less than this plus the upload is free for DATA_DIR or the temp dir"),
    ("MAX_CLIENT_PRIORITY", _int(-1000, 1000), "10", "highest priority a client may set; higher asks are lowered to it"),
)


@dataclass(frozen=True)
class Config:
    """Validated settings; attribute names are the keys in lower case."""

    values: Mapping[str, Any]
    warnings: tuple[str, ...] = ()  # unknown keys that look like ours (see unknown_keys)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name.upper()]
        except KeyError:
            raise AttributeError(name) from None

    # Derived values, computed in one place.
    @property
    def env(self) -> str:
        return self.values["APP_ENV"] or self.values["NODE_ENV"]

    @property
    def data_dir(self) -> Path:
        return Path(self.values["DATA_DIR"]).resolve()

    @property
    def database_path(self) -> Path:
        raw = self.values["DATABASE_PATH"]
        return Path(raw).resolve() if raw else self.data_dir / "imgworker.db"

    @property
    def node_name(self) -> str:
        import socket

        return self.values["NODE_NAME"] or socket.gethostname()

    @property
    def tmp_dir(self) -> Path:
        raw = self.values["TMP_DIR"]
        return Path(raw).resolve() if raw else self.data_dir / "tmp"

    @property
    def database_url(self) -> str:
        """The PostgreSQL URL, or "" for the embedded SQLite store."""
        return self.values["DATABASE_URL"]

    @property
    def database_label(self) -> str:
        """Which database this is, for messages: masked URL or SQLite path."""
        return mask_password(self.database_url) if self.database_url else str(self.database_path)

    @property
    def max_file_bytes(self) -> int:
        return int(self.values["MAX_FILE_SIZE_MB"] * 1024 * 1024)

    @property
    def quality(self) -> int:
        """Encoder quality 1-100 from COMPRESSION_QUALITY (0.1-1.0)."""
        return max(1, min(100, round(self.values["COMPRESSION_QUALITY"] * 100)))

    @property
    def max_attempts(self) -> int:
        return self.values["MAX_RETRIES"] + 1


def parse_dotenv(text: str) -> dict[str, str]:
    """Parse a .env file: KEY=VALUE lines, `export` allowed, quotes optional.

    An unquoted value ends at whitespace followed by ``#`` so the original
    service's .env, which has trailing comments, loads unchanged.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        value = value.strip()
        if value[:1] in ("'", '"') and value.find(value[0], 1) > 0:
            value = value[1 : value.find(value[0], 1)]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        out[key] = value
    return out


def load(environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> Config:
    """Build the Config from ``dotenv`` overlaid by ``environ`` (default os.environ).

    Raises ConfigError for the first bad value, naming key and value.
    """
    source: dict[str, str] = {}
    if dotenv is not None and dotenv.is_file():
        source.update(parse_dotenv(dotenv.read_text(encoding="utf-8", errors="replace")))
    from_file = set(source)
    source.update(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    raws: dict[str, str] = {}
    for name, convert, default, _doc in SETTINGS:
        raw = source.get(name)
        if raw is None or raw.strip() == "":
            raw = default
        raws[name] = raw
        try:
            values[name] = convert(raw)
        except ValueError as exc:
            raise ConfigError(f"bad value for {name}: {mask_password(raw)!r} ({mask_password(str(exc))})") from None
    if values["MEMORY_RESUME_PERCENT"] > values["MEMORY_PAUSE_PERCENT"]:
        raise ConfigError(
            f"bad value for MEMORY_RESUME_PERCENT: {raws['MEMORY_RESUME_PERCENT']!r} "
            f"(must not exceed MEMORY_PAUSE_PERCENT={values['MEMORY_PAUSE_PERCENT']!r})"
        )
    if values["RETRY_MAX_DELAY_MS"] < values["RETRY_BASE_DELAY_MS"]:
        raise ConfigError(
            f"bad value for RETRY_MAX_DELAY_MS: {raws['RETRY_MAX_DELAY_MS']!r} "
            f"(must not be below RETRY_BASE_DELAY_MS={values['RETRY_BASE_DELAY_MS']!r})"
        )
    return Config(values, unknown_keys(from_file, set(source) - from_file))


# Prefixes of our keys: an unknown .env key starting with one is surely a typo.
OUR_PREFIXES = ("MAX_", "JOB_", "RATE_LIMIT_", "MEMORY_", "RETRY_", "WORKER_", "BATCH_", "CLEANUP_",
                "COMPRESSION_", "SHUTDOWN_", "DATABASE_", "OUTPUT_", "SUPPORTED_", "CORS_", "TRUST_")


def unknown_keys(file_keys: set[str], env_keys: set[str]) -> tuple[str, ...]:
    """Warnings for keys that look like ours but are not (a misspelt
    ``MAX_CONCURENT_JOBS`` would otherwise be ignored without a word): keys
    of the .env file with one of our prefixes or close to a known name, and
    environment variables close to a known name (the environment holds many
    other programs' variables)."""
    import difflib

    known = [name for name, *_ in SETTINGS]
    out = []
    for key in sorted(file_keys | env_keys):
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
        if key in file_keys and (close or key.startswith(OUR_PREFIXES)):
            out.append(f"unknown setting {key} in .env is ignored"
                       + (f"; did you mean {close[0]}?" if close else ""))
        elif key in env_keys and close:
            out.append(f"unknown setting {key} in the environment is ignored; did you mean {close[0]}?")
    return tuple(out)


def changes(old: Config, new: Config) -> list[str]:
    """``KEY old -> new`` for each setting that differs (for the reload log line)."""
    show = lambda v: mask_password(v) if isinstance(v, str) else v  # noqa: E731
    return [f"{name} {show(old.values[name])!r} -> {show(new.values[name])!r}"
            for name, *_ in SETTINGS if old.values[name] != new.values[name]]


def table_markdown() -> str:
    """The README's configuration table, generated from SETTINGS."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, _convert, default, doc in SETTINGS:
        rows.append(f"| `{name}` | `{default}` | {doc} |")
    return "\n".join(rows)
