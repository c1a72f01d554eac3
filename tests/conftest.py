"""Shared fixtures: real SQLite files in tmp_path, configs, generated images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from imgworker import config as config_mod
from imgworker.queue import JobQueue, NewJob

from helpers import image_bytes  # noqa: F401  (re-exported for fixtures)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"
if not CORPUS.is_dir():
    CORPUS = Path(os.environ.get("IMGWORKER_CORPUS", "/work/shared/corpus"))


@pytest.fixture
def make_config(tmp_path):
    """Build a Config for a data dir under tmp_path, with overrides."""

    def build(**overrides):
        env = {"DATA_DIR": str(tmp_path / "data"), "APP_ENV": "test"}
        env.update({k: str(v) for k, v in overrides.items()})
        return config_mod.load(env, dotenv=None)

    return build


@pytest.fixture
def cfg(make_config):
    return make_config()


@pytest.fixture
def queue(tmp_path):
    q = JobQueue(tmp_path / "queue.db")
    q.migrate()
    yield q
    q.close()


@pytest.fixture
def add_jobs(queue, tmp_path):
    """Enqueue n jobs; returns their ids in submission order."""
    counter = iter(range(10**9))

    def add(n=1, priority=0, max_queue=10**9, max_attempts=4, batch_id=None, **options):
        ids = []
        jobs = []
        for _ in range(n):
            i = next(counter)
            job_id = f"job-{i:06d}"
            ids.append(job_id)
            jobs.append(NewJob(job_id, str(tmp_path / f"in-{i}"), f"f{i}.jpg", 10,
                               priority=priority, options=options, batch_id=batch_id))
        queue.enqueue(jobs, max_queue, max_attempts)
        return ids

    return add


@pytest.fixture
def corpus():
    if not CORPUS.is_dir():
        pytest.skip("shared/corpus is absent")
    return CORPUS


PYTHON = sys.executable
