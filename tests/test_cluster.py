"""Several nodes, one PostgreSQL database, one shared data directory.

Each node is a real ``imgworker serve`` (API + supervisor + pool) with its
own port and working directory; they share DATABASE_URL (a fresh database on
the private test server) and DATA_DIR. Jobs go in through both APIs.
"""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter

import psutil
import pytest

from conftest import wait_for
from helpers import Http, free_port, image_bytes
from imgworker.model import output_filename


class Node:
    def __init__(self, name, tmp_path, url, shared, **env):
        self.name = name
        self.cwd = tmp_path / name
        self.cwd.mkdir()
        self.port = free_port()
        self.http = Http(f"http://127.0.0.1:{self.port}")
        self.log_path = self.cwd / "serve.log"
        self.env = {**os.environ, "DATABASE_URL": url, "DATA_DIR": str(shared), "PORT": str(self.port),
                    "APP_ENV": "test", "LOG_LEVEL": "info", "MAX_CONCURRENT_JOBS": "2", "JOB_TIMEOUT_MS": "5000",
                    "RETRY_BASE_DELAY_MS": "100", "RETRY_MAX_DELAY_MS": "500", "MAX_QUEUE_SIZE": "2000",
                    "RATE_LIMIT_MAX_REQUESTS": "100000", "MAX_IMAGE_WIDTH": "640", "MAX_IMAGE_HEIGHT": "640",
                    **{k: str(v) for k, v in env.items()}}
        self.proc = subprocess.Popen([sys.executable, "-m", "imgworker", "serve"], env=self.env, cwd=self.cwd,
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def healthy(self):
        try:
            return self.http.get("/api/health").status == 200
        except OSError:
            return False

    def log(self):
        return self.log_path.read_text(errors="replace")

    def kill9(self):
        """SIGKILL the node's whole process tree at once (a power cut of the node)."""
        procs = []
        try:
            parent = psutil.Process(self.proc.pid)
            procs = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        psutil.wait_procs(procs, timeout=5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def cluster(pg_url, tmp_path):
    """Factory: cluster(n, **env) -> n healthy nodes; all stopped at teardown."""
    nodes = []
    shared = tmp_path / "shared-data"

    def start(n=2, **env):
        made = [Node(f"node{len(nodes) + i}", tmp_path, pg_url, shared, **env) for i in range(n)]
        nodes.extend(made)
        for node in made:
            wait_for(node.healthy, 30, interval=0.1, message=f"{node.name} healthy")
        return made

    yield start
    for node in nodes:
        node.stop()


def _store(pg_url):
    from imgworker.store.postgres import PgStore

    return PgStore(pg_url)


def _submit(nodes, count, photo):
    ids = []
    for i in range(count):
        r = nodes[i % len(nodes)].http.upload(files=[("image", f"img{i}.jpg", photo)])
        assert r.status == 202, r.json
        ids.append(r.json["jobId"])
    return ids


def _completions(nodes):
    """job id -> how many times a node logged completing it."""
    seen = Counter()
    for node in nodes:
        seen.update(re.findall(r"job=([0-9a-f-]{36}) Job completed", node.log()))
    return seen


def _check_all_done(store, ids, nodes, shared):
    rows = {j.id: j for j in (store.get(i) for i in ids)}
    assert Counter(j.status for j in rows.values()) == {"completed": len(ids)}
    assert max(_completions(nodes).values()) == 1  # no job was completed twice
    for job in rows.values():
        out = shared / "processed" / output_filename(job.id, job.outcome.output_format)
        assert out.is_file() and out.stat().st_size == job.outcome.output_size
    # any node serves any output
    survivor = [n for n in nodes if n.proc.poll() is None][0]
    some = survivor.http.get(f"/api/job/{ids[0]}").json["result"]["processedFile"]
    assert survivor.http.get(some["url"]).status == 200


class Submitter(threading.Thread):
    """Uploads ``count`` jobs through the nodes in turn, in the background;
    a node that stops answering, or dies while answering, is skipped from
    then on (its clients move to a live node, as behind a load balancer).
    An upload cut off mid-answer may have been accepted: such jobs are not in
    ``ids`` but must complete too (checked from the whole table)."""

    def __init__(self, nodes, count, photo):
        super().__init__(daemon=True)
        self.nodes, self.count, self.photo = list(nodes), count, photo
        self.ids: list[str] = []
        self.error = None

    def run(self):
        try:
            i = 0
            while len(self.ids) < self.count:
                node = self.nodes[i % len(self.nodes)]
                i += 1
                try:
                    r = node.http.upload(files=[("image", f"img{i}.jpg", self.photo)])
                except (OSError, http.client.HTTPException):
                    self.nodes.remove(node)
                    continue
                assert r.status == 202, r.json
                self.ids.append(r.json["jobId"])
        except BaseException as exc:  # reported by the test
            self.error = exc


def _kill_mid_run(nodes, pg_url, tmp_path, jobs):
    a, b = nodes
    store = _store(pg_url)
    submitter = Submitter([a, b], jobs, image_bytes("JPEG", (1600, 1200), quality=90))
    submitter.start()
    b_sup = wait_for(lambda: [s.id for s in store.supervisors() if s.pid in
                              {p.pid for p in psutil.Process(b.proc.pid).children(recursive=True)}],
                     10, message="node1's supervisor row")[0]

    def b_holds_jobs():
        done = store.stats().by_status["completed"]
        held = [j.id for j in store.list("processing", 100) if j.lease_owner == b_sup]
        return held if done >= jobs // 10 and held else None

    held = wait_for(b_holds_jobs, 120, interval=0.01, message="node1 mid-run holding jobs")
    b.kill9()
    killed_at = time.monotonic()
    lease_s = (int(b.env["JOB_TIMEOUT_MS"]) + 10_000) / 1000  # supervisor.LEASE_GRACE_MS
    wait_for(lambda: all(store.get(i).status == "completed" for i in held), lease_s + 5, interval=0.05,
             message="the killed node's jobs finished by the other node")
    took = time.monotonic() - killed_at
    submitter.join(120)
    assert submitter.error is None and len(submitter.ids) == jobs
    # every row, including one accepted by the killed node without its answer arriving
    wait_for(lambda: (lambda s: s.waiting + s.processing == 0 and s.completed >= jobs)(store.stats()), 180,
             interval=0.2, message=f"all {jobs} jobs completed")
    stats = store.stats()
    assert stats.completed == stats.total <= jobs + 1  # at most one upload was cut off by the kill
    _check_all_done(store, submitter.ids, [a, b], tmp_path / "shared-data")
    store.close()
    return held, took


def test_two_nodes_300_jobs_one_killed(cluster, pg_url, tmp_path):
    """300 jobs through two nodes; one node's whole tree is kill -9'd mid-run:
    300/300 completed exactly once with their outputs, and the jobs the dead
    node held are finished by the other within the lease + 5 s."""
    held, took = _kill_mid_run(cluster(2), pg_url, tmp_path, 300)
    assert held and took < (5000 + 10_000) / 1000 + 5


def test_a_node_on_another_host_is_recovered_by_lease_expiry(cluster, pg_url, tmp_path):
    """The second node registers under another name (as on another host):
    its pid cannot be checked, so its jobs come back by lease expiry alone,
    after the lease (JOB_TIMEOUT_MS + 10 s) and within the lease + 5 s."""
    (a,) = cluster(1)
    (b,) = cluster(1, NODE_NAME="another-host")
    held, took = _kill_mid_run([a, b], pg_url, tmp_path, 40)
    lease_s = (5000 + 10_000) / 1000
    assert held and lease_s - 3 < took < lease_s + 5


def test_database_restart_mid_run(cluster, pg_url, pg_server, tmp_path):
    a, b = cluster(2)
    store = _store(pg_url)
    photo = image_bytes("JPEG", (1600, 1200), quality=90)
    ids = _submit([a, b], 60, photo)
    wait_for(lambda: store.stats().by_status["completed"] >= 10, 60, interval=0.05, message="10 done")
    store.close()
    pg_server.ctl("restart")
    store = _store(pg_url)
    # both nodes keep serving: new jobs go in through each API and are processed
    ids += _submit([a, b], 10, image_bytes("PNG", (300, 200)))
    wait_for(lambda: store.stats().by_status["completed"] == len(ids), 120, interval=0.2,
             message=f"all {len(ids)} jobs completed")
    _check_all_done(store, ids, [a, b], tmp_path / "shared-data")
    assert a.proc.poll() is None and b.proc.poll() is None
    # both nodes' APIs and supervisors are registered; stats and metrics add up the live supervisors
    kinds = Counter(n["kind"] for n in store.nodes())
    assert kinds == {"api": 2, "supervisor": 2}
    stats = a.http.get("/api/stats").json
    assert stats["supervisors"] == 2 and stats["workers"]["configured"] == 4
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(b.http.get("/metrics").body.decode())}
    rss = families["imgworker_worker_rss_bytes"].samples  # one per worker, labels unique across nodes
    assert len(rss) == 4 and len({tuple(sorted(s.labels.items())) for s in rss}) == 4
    assert "Database connection lost" in a.log() + b.log()
    store.close()
