"""Settings: defaults, every key parsed, the seed .env, bad values exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imgworker import config

SEED_ENV = """# Server Configuration
PORT=3001
NODE_ENV=development

# Job Queue Configuration
MAX_CONCURRENT_JOBS=3           # How many jobs process simultaneously
JOB_TIMEOUT_MS=30000           # 30 second timeout per job
MAX_QUEUE_SIZE=100             # Maximum queued jobs
CLEANUP_INTERVAL_MS=60000      # Cleanup old jobs every minute

# Image Processing Configuration
MAX_FILE_SIZE_MB=50            # 50MB file size limit
MAX_IMAGE_WIDTH=1024           # Resize width limit
MAX_IMAGE_HEIGHT=1024          # Resize height limit
COMPRESSION_QUALITY=0.8        # Image compression quality (0.1-1.0)
SUPPORTED_FORMATS=jpeg,png,webp,gif

# Rate Limiting (per IP)
RATE_LIMIT_WINDOW_MS=900000    # 15 minute window
RATE_LIMIT_MAX_REQUESTS=100    # 100 requests per window
"""

EVERY_KEY = {
    "PORT": ("8080", 8080), "MAX_CONCURRENT_JOBS": ("5", 5), "JOB_TIMEOUT_MS": ("60000", 60000),
    "MAX_QUEUE_SIZE": ("500", 500), "CLEANUP_INTERVAL_MS": ("1000", 1000), "MAX_FILE_SIZE_MB": ("20", 20.0),
    "MAX_IMAGE_WIDTH": ("2048", 2048), "MAX_IMAGE_HEIGHT": ("800", 800), "COMPRESSION_QUALITY": ("0.5", 0.5),
    "SUPPORTED_FORMATS": ("png, JPG", ("png", "jpeg")), "RATE_LIMIT_WINDOW_MS": ("1000", 1000),
    "RATE_LIMIT_MAX_REQUESTS": ("50", 50),
    "CORS_ORIGINS": ("https://yourdomain.com,https://www.yourdomain.com",
                     ("https://yourdomain.com", "https://www.yourdomain.com")),
    "NODE_ENV": ("production", "production"), "APP_ENV": ("test", "test"), "HOST": ("0.0.0.0", "0.0.0.0"),
    "DATA_DIR": ("/srv/img", "/srv/img"), "DATABASE_PATH": ("/srv/q.db", "/srv/q.db"),
    "DATABASE_URL": ("postgresql://img:pw@db.internal:5432/imgworker", "postgresql://img:pw@db.internal:5432/imgworker"),
    "TMP_DIR": ("/var/tmp/imgworker", "/var/tmp/imgworker"),
    "NODE_NAME": ("node-7", "node-7"),
    "MAX_RETRIES": ("5", 5),
    "RETRY_BASE_DELAY_MS": ("500", 500), "RETRY_MAX_DELAY_MS": ("9000", 9000), "JOB_RETENTION_MS": ("3600000", 3600000),
    "MAX_INPUT_PIXELS": ("1000000", 1000000), "MAX_FRAMES": ("10", 10), "MAX_ANIMATION_PIXELS": ("5000000", 5000000),
    "MAX_JPEG_SCANS": ("50", 50),
    "BATCH_MAX_FILES": ("5", 5), "OUTPUT_FORMAT": ("jpeg", "jpeg"), "MEMORY_PAUSE_PERCENT": ("70", 70.0),
    "MEMORY_RESUME_PERCENT": ("60", 60.0), "WORKER_MAX_RSS_MB": ("512", 512), "WORKER_SCHEDULING": ("Batch", "batch"),
    "SHUTDOWN_TIMEOUT_MS": ("5000", 5000),
    "TRUST_PROXY": ("yes", True), "LOG_LEVEL": ("DEBUG", "debug"), "LOG_FORMAT": ("JSON", "json"),
    "MAX_CONNECTIONS": ("2000", 2000), "MAX_CONNECTIONS_PER_CLIENT": ("8", 8), "HEADER_TIMEOUT_MS": ("5000", 5000),
    "BODY_MIN_BYTES_PER_S": ("1024", 1024), "MIN_FREE_DISK_MB": ("64", 64), "MAX_CLIENT_PRIORITY": ("5", 5),
    "AVIF_SPEED": ("9", 9),
}


def test_defaults_match_the_contract():
    cfg = config.load({}, dotenv=None)
    assert (cfg.port, cfg.max_concurrent_jobs, cfg.job_timeout_ms, cfg.max_queue_size) == (3001, 3, 30000, 100)
    assert cfg.max_file_bytes == 50 * 2**20 and cfg.quality == 80 and cfg.supported_formats == ("jpeg", "png", "webp", "gif")
    assert cfg.host == "127.0.0.1" and cfg.database_path == Path("data/imgworker.db").resolve()
    assert cfg.max_attempts == 4 and cfg.env == "development" and cfg.output_format == "webp"


def test_every_key_is_parsed():
    assert set(EVERY_KEY) == {name for name, *_ in config.SETTINGS}
    cfg = config.load({k: raw for k, (raw, _) in EVERY_KEY.items()}, dotenv=None)
    for key, (_, want) in EVERY_KEY.items():
        assert cfg.values[key] == want, key
    assert cfg.env == "test"  # APP_ENV wins over NODE_ENV


def test_seed_env_loads_unchanged_and_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(SEED_ENV)
    cfg = config.load({}, dotenv=env_file)
    assert cfg.max_concurrent_jobs == 3 and cfg.compression_quality == 0.8 and cfg.rate_limit_window_ms == 900000
    assert config.load({"MAX_CONCURRENT_JOBS": "7"}, dotenv=env_file).max_concurrent_jobs == 7


@pytest.mark.parametrize("key, value", [
    ("PORT", "abc"), ("PORT", "70000"), ("MAX_CONCURRENT_JOBS", "0"), ("COMPRESSION_QUALITY", "1.5"),
    ("COMPRESSION_QUALITY", "0.05"), ("SUPPORTED_FORMATS", "jpeg,bmp"), ("OUTPUT_FORMAT", "tiff"),
    ("AVIF_SPEED", "11"),
    ("TRUST_PROXY", "maybe"), ("CORS_ORIGINS", "not an origin"), ("LOG_LEVEL", "loud"),
    ("LOG_FORMAT", "xml"), ("MAX_CONNECTIONS", "3"), ("HEADER_TIMEOUT_MS", "5"),
    ("MEMORY_RESUME_PERCENT", "95"), ("MAX_FILE_SIZE_MB", "-1"), ("NODE_ENV", "staging"),
    ("DATABASE_URL", "sqlite:///x.db"), ("DATABASE_URL", "postgresql://host-only"),
])
def test_bad_values_name_key_and_value(key, value):
    with pytest.raises(config.ConfigError) as err:
        config.load({key: value}, dotenv=None)
    assert key in str(err.value) and repr(value) in str(err.value)


def test_cli_exits_2_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "imgworker", "stats"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path), "MAX_QUEUE_SIZE": "lots"})
    assert proc.returncode == 2
    assert "MAX_QUEUE_SIZE" in proc.stderr and "'lots'" in proc.stderr


def test_unknown_keys_that_look_like_ours_are_warned_about(tmp_path):
    """Bug 12: a misspelt .env key is not silently ignored; the seed .env and
    unrelated environment variables give no warning."""
    env_file = tmp_path / ".env"
    env_file.write_text(SEED_ENV + "MAX_CONCURENT_JOBS=9\nJOB_TIMOUT=5\nVITE_API_URL=http://x\n")
    cfg = config.load({"MAX_RETRYS": "2", "HOME": "/root", "JOB_ID": "ci-42"}, dotenv=env_file)
    assert cfg.warnings == (
        "unknown setting JOB_TIMOUT in .env is ignored",
        "unknown setting MAX_CONCURENT_JOBS in .env is ignored; did you mean MAX_CONCURRENT_JOBS?",
        "unknown setting MAX_RETRYS in the environment is ignored; did you mean MAX_RETRIES?",
    )
    env_file.write_text(SEED_ENV)
    assert config.load({"PATH": "/bin"}, dotenv=env_file).warnings == ()
    (tmp_path / ".env").write_text("MAX_CONCURENT_JOBS=9\n")
    r = subprocess.run([sys.executable, "-m", "imgworker", "migrate", "--status"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path / "d")})
    assert r.returncode == 0 and "warning: unknown setting MAX_CONCURENT_JOBS in .env" in r.stderr
