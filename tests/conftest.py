"""Shared fixtures: real SQLite files in tmp_path, configs, generated images."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from imgworker import config as config_mod
from imgworker.model import Outcome
from imgworker.store import NewJob
from imgworker.store.sqlite import SqliteStore

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


def _sqlite_store(request, tmp_path):
    return SqliteStore(tmp_path / "queue.db")


def _postgres_store(request, tmp_path):
    """A fresh database on the private PostgreSQL server (pg_url skips
    when the server cannot be had)."""
    from imgworker.store.postgres import PgStore

    return PgStore(request.getfixturevalue("pg_url"))


# Every JobStore implementation, by name: the contract suite
# (test_store_contract.py) runs once per entry.
STORE_FACTORIES = {"sqlite": _sqlite_store, "postgres": _postgres_store}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request, tmp_path):
    """A migrated, empty job store of each implementation."""
    s = STORE_FACTORIES[request.param](request, tmp_path)
    s.migrate()
    yield s
    s.close()


def make_outcome(processing_ms=10, **fields):
    """An Outcome for store tests (a 100-byte JPEG made into a 40-byte WebP)."""
    values = dict(processing_ms=processing_ms, input_format="jpeg", input_size=100, input_width=64,
                  input_height=48, output_format="webp", output_size=40, output_width=64, output_height=48)
    values.update(fields)
    return Outcome(**values)


@pytest.fixture
def add_jobs(store, tmp_path):
    """Enqueue n jobs; returns their ids in submission order."""
    counter = iter(range(10**9))

    def add(n=1, priority=0, max_queue=10**9, max_attempts=4, batch_id=None, client="", **options):
        ids = []
        jobs = []
        for _ in range(n):
            i = next(counter)
            job_id = f"job-{i:06d}"
            ids.append(job_id)
            jobs.append(NewJob(job_id, str(tmp_path / f"in-{i}"), f"f{i}.jpg", 10,
                               priority=priority, options=options, batch_id=batch_id, client=client))
        store.enqueue(jobs, max_queue, max_attempts)
        return ids

    return add


@pytest.fixture(scope="session")
def pg_server():
    """A private PostgreSQL server for the whole session (tests/pg.py);
    skips only when the binaries or psycopg cannot be had."""
    import pg

    server, why = pg.start_server()
    if server is None:
        pytest.skip(why)
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    """URL of a fresh, empty database on the session's server, dropped after."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def corpus():
    if not CORPUS.is_dir():
        pytest.skip("shared/corpus is absent")
    return CORPUS


@pytest.fixture
def photo_png():
    """PNG bytes of a photo-like picture (smooth colour noise: every PNG
    filter type gets used) in ``mode``; RGBA and LA get a real alpha ramp
    (0 to 255, transparent to opaque). ``save`` goes to Pillow's encoder."""
    def make(mode="RGB", size=(301, 203), **save):
        from PIL import Image

        noise = [Image.effect_noise((size[0] // 8 + 1, size[1] // 8 + 1), 80 + 20 * i).resize(size) for i in range(3)]
        im = Image.merge("RGB", noise)
        if mode == "P":
            im = im.quantize(200)
        elif mode != "RGB":
            im = im.convert(mode[0] if mode in ("L", "LA") else "RGB")
        if mode in ("RGBA", "LA"):
            im.putalpha(Image.linear_gradient("L").resize(size))
        buf = io.BytesIO()
        im.save(buf, "PNG", **save)
        return buf.getvalue()
    return make


PYTHON = sys.executable


class Service:
    """A real `imgworker <command>` process on a data dir under tmp_path."""

    def __init__(self, tmp_path, env, command="worker"):
        import subprocess
        from imgworker.storage import Storage

        self.tmp_path = tmp_path
        # tests/hooks/sitecustomize.py gives these processes the `_testSleepMs` job option
        hooks = str(Path(__file__).resolve().parent / "hooks")
        pythonpath = os.pathsep.join(p for p in (hooks, os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "APP_ENV": "test", "LOG_LEVEL": "info",
                    "PYTHONPATH": pythonpath, "IMGWORKER_TEST_HOOKS": "1", **{k: str(v) for k, v in env.items()}}
        self.command = command
        self.log_path = tmp_path / f"{command}.log"
        self.storage = Storage(tmp_path / "data")
        self.storage.ensure()
        self.store = SqliteStore(tmp_path / "data" / "imgworker.db")
        self.store.migrate()
        self.proc = None
        self._subprocess = subprocess

    def start(self):
        self.proc = self._subprocess.Popen(
            [sys.executable, "-m", "imgworker", self.command], env=self.env, cwd=self.tmp_path,
            stdout=open(self.log_path, "ab"), stderr=self._subprocess.STDOUT, start_new_session=True,
        )
        return self

    def log(self):
        return self.log_path.read_text(errors="replace")

    def submit(self, data, priority=0, name="img.jpg", max_attempts=None, **options):
        import uuid

        job_id = uuid.uuid4().hex
        if max_attempts is None:
            max_attempts = int(self.env.get("MAX_RETRIES", 3)) + 1
        path = self.storage.uploads / f"{job_id}.bin"
        path.write_bytes(data)
        self.store.enqueue([NewJob(job_id, str(path), name, len(data), priority=priority, options=options)],
                           10**6, max_attempts)
        self.store.notify()
        return job_id

    def state(self):
        sups = self.store.supervisors()
        return sups[0].state if sups else {}

    def stop(self, sig=None):
        import signal as _signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig or _signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.kill_tree()
        return self.proc.returncode if self.proc else None

    def kill_tree(self):
        """SIGKILL the process and every descendant at once."""
        import psutil

        try:
            parent = psutil.Process(self.proc.pid)
            procs = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        psutil.wait_procs(procs, timeout=5)


def wait_for(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll ``predicate`` until it returns truthy or ``timeout`` passes."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def service(tmp_path):
    """Factory: service(**env) -> started Service; all stopped at teardown."""
    made = []

    def make(command="worker", start=True, **env):
        s = Service(tmp_path, env, command)
        made.append(s)
        return s.start() if start else s

    yield make
    for s in made:
        if s.proc and s.proc.poll() is None:
            s.kill_tree()


@pytest.fixture
def api_server(make_config):
    """Factory: a real Waitress server for the API on 127.0.0.1 in this
    process (no supervisor), returning (Http client, Api)."""
    import threading

    from helpers import Http
    from imgworker.api import make_server

    running = []

    def serve(server, stop):
        server.serve_until(stop, timeout=0.05)
        server.close()  # in the loop's own thread: no poll on a closed socket

    def start(**overrides):
        cfg = make_config(**overrides)
        server = make_server(cfg, port=0)
        server.api.store.migrate()
        stop = threading.Event()
        thread = threading.Thread(target=serve, args=(server, stop), daemon=True)
        thread.start()
        running.append((server, stop, thread))
        return Http(f"http://127.0.0.1:{server.effective_port}"), server.api

    yield start
    for server, stop, thread in running:
        stop.set()
        thread.join(timeout=5)
        server.task_dispatcher.shutdown(timeout=2)
        server.api.store.close()
