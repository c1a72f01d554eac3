"""Chaos, hostile-input, fuzz and load suites against a real `imgworker serve`.

A quick pass of each runs in every CI run; the full sizes run with
``bash .ci/run -m slow tests/test_suites.py`` (figures in the README). Each
writes its report to test-artifacts/<name>.json.
"""

from __future__ import annotations

import json
import random
import time

import pytest

import suites
from conftest import CORPUS, ROOT, wait_for

ARTIFACTS = ROOT / "test-artifacts"


def report(name, data):
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    return data


def check_chaos(r):
    assert r["lost"] == [] and r["not_completed"] == []
    assert r["rows"] >= r["accepted"] and r["statuses"] == {"completed": r["rows"]}
    assert r["outputs_ok"], "exactly one output file per job, no temp files"
    assert r["orphan_uploads"] == [] and r["tmp_files"] == []


def test_chaos_quick(service):
    check_chaos(report("chaos-quick", suites.chaos(service, n_jobs=60, tree_kills=2, worker_kills=2)))


@pytest.mark.slow
def test_chaos_full(service):
    r = report("chaos-full", suites.chaos(service, n_jobs=500, tree_kills=6, worker_kills=8))
    check_chaos(r)
    assert r["accepted"] == 500


def run_hostile(service, truncations):
    svc, http = suites.serve(service, RATE_LIMIT_MAX_REQUESTS=10**6, MAX_QUEUE_SIZE=10**5, JOB_TIMEOUT_MS=10000)
    svc.start()
    wait_for(lambda: suites.healthy(http), 30, 0.05)
    rng = random.Random(11)
    cases = suites.attacks(rng, truncations)
    for folder in ("bad", "edge"):
        if (CORPUS / folder).is_dir():
            cases += [(f"{folder}/{p.name}", p.read_bytes()) for p in sorted((CORPUS / folder).iterdir())]
    outcomes, pending, problems = {}, {}, []
    for name, data in cases:
        started = time.monotonic()
        r = suites.upload(http, data, name.rsplit("/", 1)[-1])
        if r.status >= 500 or not r.json or (r.status != 202 and not r.json.get("code")):
            problems.append((name, r.status, r.body[:200]))
        elif r.status == 202:
            pending[name] = r.json["jobId"]
        else:
            outcomes[name] = f"{r.status} {r.json['code']}"
        if time.monotonic() - started > 5:
            problems.append((name, "slow answer", time.monotonic() - started))
    for name, job_id in pending.items():
        job = wait_for(lambda: (lambda j: j if j["status"] in suites.FINAL else None)(http.get(f"/api/job/{job_id}").json),
                       30, 0.05, f"{name} finished")
        outcomes[name] = "completed" if job["status"] == "completed" else f"failed {job.get('errorCode')}"
        if job["status"] == "failed" and not job.get("errorCode"):
            problems.append((name, "failed without a code"))
    for name, raw in suites.multipart_attacks(int(http.port)):
        status = int(raw.split(" ", 2)[1]) if raw.startswith("HTTP/") else 0
        outcomes[f"http/{name}"] = status
        if status >= 500 and status != 0 or (status == 0 and name != "truncated_body"):
            problems.append((name, status, raw[:200]))
    q = svc.store
    try:  # the 202s of the HTTP-level cases must finish too
        wait_for(lambda: q.stats().waiting + q.stats().processing == 0, 30, 0.05)
    except AssertionError:
        pass  # reported below as stuck
    healthy = suites.healthy(http)
    stats = q.stats()
    leftovers = [p.name for p in svc.storage.tmp.iterdir()]
    svc.stop()
    return {"cases": len(outcomes), "problems": problems, "healthy_after": healthy, "outcomes": outcomes,
            "stuck": stats.by_status["processing"] + stats.waiting, "tmp_left": leftovers}


def check_hostile(r):
    assert r["problems"] == [] and r["healthy_after"] and r["stuck"] == 0 and r["tmp_left"] == []
    o = r["outcomes"]
    assert o["png_ihdr_60000.png"] == "422 IMAGE_TOO_LARGE" and o["jpeg_sof_30000.jpg"] == "422 IMAGE_TOO_LARGE"
    assert o["http/duplicate_image"] == 400 and o["http/huge_field"] == 400 and o["http/wrong_boundary"] == 400
    assert o["http/chunked"] == 202 and o["http/slow_upload"] == 202
    assert o["zero.jpg"] == "422 INVALID_IMAGE" and o["exe.jpg"] == "415 UNSUPPORTED_FORMAT"


def test_hostile_quick(service):
    check_hostile(report("hostile-quick", run_hostile(service, truncations=12)))


@pytest.mark.slow
def test_hostile_full(service):
    check_hostile(report("hostile-full", run_hostile(service, truncations=200)))


def run_fuzz(service, tmp_path, n):
    rng = random.Random(42)
    seeds = suites.seeds()
    folder = tmp_path / "fuzz"
    folder.mkdir()
    files = []
    for i in range(n):
        p = folder / f"m{i:05d}.bin"
        p.write_bytes(suites.mutate(rng, rng.choice(seeds)))
        files.append(p)
    pipeline = suites.fuzz_pipeline(files)
    svc, http = suites.serve(service, RATE_LIMIT_MAX_REQUESTS=10**6, MAX_QUEUE_SIZE=10**5, JOB_TIMEOUT_MS=5000,
                             MAX_INPUT_PIXELS=4_000_000, MAX_ANIMATION_PIXELS=40_000_000, LOG_LEVEL="warning")
    svc.start()
    wait_for(lambda: suites.healthy(http), 30, 0.05)
    statuses, jobs, server_errors = {}, [], []
    for p in files:
        r = suites.upload(http, p.read_bytes(), p.name)
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.status >= 500:
            server_errors.append((p.name, r.status))
        elif r.status == 202:
            jobs.append(r.json["jobId"])
        elif not r.json.get("code"):
            server_errors.append((p.name, "no code"))
    q = svc.store
    wait_for(lambda: q.stats().waiting + q.stats().processing == 0, 300, 0.25, "fuzz jobs done")
    rows = [q.get(j) for j in jobs]
    healthy = suites.healthy(http)
    svc.stop()
    codes = {}
    for code in pipeline["outcomes"].values():
        codes[code] = codes.get(code, 0) + 1
    return {
        "inputs": n, "pipeline_outcomes": codes, "pipeline_crashes": pipeline["crashes"],
        "http_statuses": statuses, "server_errors": server_errors, "healthy_after": healthy,
        "jobs": len(rows), "jobs_by_status": {s: sum(r.status == s for r in rows) for s in {r.status for r in rows}},
        "failed_without_code": [r.id for r in rows if r.status == "failed" and not r.error_code],
    }


def check_fuzz(r):
    assert r["pipeline_crashes"] == [] and "CRASH" not in r["pipeline_outcomes"]
    assert r["server_errors"] == [] and r["healthy_after"] and r["failed_without_code"] == []
    assert set(r["jobs_by_status"]) <= {"completed", "failed"}


def test_fuzz_quick(service, tmp_path):
    check_fuzz(report("fuzz-quick", run_fuzz(service, tmp_path, 150)))


@pytest.mark.slow
def test_fuzz_full(service, tmp_path):
    check_fuzz(report("fuzz-full", run_fuzz(service, tmp_path, 2000)))


def check_load(r, submissions):
    assert r["bad"] == [] and r["not_completed"] == []
    assert sum(r["statuses"].values()) == submissions and set(r["statuses"]) <= {202, 429, 503}
    assert max(r["peak_rss_mb"].values()) < 600


def test_load_quick(service):
    # one rate-limit window spans the run, so the limit engages however slowly a
    # loaded machine submits (a 2 s window needs more than 60 uploads a second)
    r = report("load-quick", suites.load(service, submissions=300, clients=8, queue_size=20, rate_limit=200,
                                         window_ms=600_000))
    check_load(r, 300)
    assert r["statuses"].get(429) and r["statuses"].get(503)  # both limits engaged


@pytest.mark.slow
def test_load_full(service):
    r = report("load-full", suites.load(service, submissions=5000, clients=16, queue_size=50, rate_limit=150))
    check_load(r, 5000)
    assert r["statuses"].get(429) and r["statuses"].get(503)  # both limits engaged


def check_slow_clients(r):
    assert r["failure_count"] == 0, r["failures"]
    # issue 15: another client's requests within 100 ms p99, on top of what the
    # machine's own load costs them now (measured without the attack just before;
    # a few ms on a quiet machine: slow clients that held the server would add seconds)
    assert r["p99_ms"] < 100 + r["without_attack"]["p99_ms"], r


def test_slow_clients_quick(service):
    # one client: the per-client limit answers most of its connections at once
    r = report("slow-clients-quick", suites.slow_clients(service, n_slow=300, seconds=5, interval=1.0,
                                                          HEADER_TIMEOUT_MS=2000))
    check_slow_clients(r)
    assert r["attacker"]["answers"].get("503", 0) > 0  # the per-client limit engaged
    assert r["attacker"]["answers"].get("408", 0) > 0  # the header and body deadlines cut slow senders
    # many addresses, each under the per-client limit: the server holds them all (MAX_CONNECTIONS=200 here)
    r = report("slow-clients-spread-quick", suites.slow_clients(service, n_slow=300, seconds=5, interval=1.0,
                                                                 sources=15, MAX_CONNECTIONS=200))
    check_slow_clients(r)


@pytest.mark.slow
def test_slow_clients_full(service):
    check_slow_clients(report("slow-clients-full", suites.slow_clients(service, n_slow=1000, seconds=30, interval=2.0)))
    # 1,000 slow connections from 50 addresses (20 each, under the per-client limit): all held
    check_slow_clients(report("slow-clients-spread-full", suites.slow_clients(service, n_slow=1000, seconds=30,
                                                                              interval=2.0, sources=50)))


def check_decoders(r):
    c = r["checked"]
    # CPU and memory bombs: refused from their structure at upload, no job
    for name in ("jpeg_scans", "gif_frames_beyond_screen"):
        assert c[name]["status"] == 422 and c[name]["code"] == "IMAGE_TOO_LARGE", (name, c[name])
    # valid but heavy to probe: accepted after a bounded check, then processed as usual
    for name in ("png_ztxt", "gif_many_frames"):
        assert c[name]["status"] == 202 and c[name]["job"] in ("completed", "failed"), (name, c[name])
    assert c["gif_many_frames"]["job"] == "completed" and c["gif_many_frames"]["framesIn"] == 1001
    assert all(got["seconds"] < 3 for got in c.values()), c
    assert r["api_rss_mb"]["peak"] - r["api_rss_mb"]["before"] < 40, r["api_rss_mb"]
    assert r["jobs"] == len(r["stripped"]) + 2  # the refused bombs left no row
    for name, got in r["stripped"].items():
        assert got["status"] == "completed" and not got["leaked"] and got["well_formed"] is True, (name, got)
    assert r["healthy_after"]


def test_decoders_quick(service):
    check_decoders(report("decoders-quick", suites.decoder_attacks(service, full=False)))


@pytest.mark.slow
def test_decoders_full(service):
    check_decoders(report("decoders-full", suites.decoder_attacks(service, full=True)))


def check_chunked_flood(r):
    # refused on the headers (health), at the 1 MB limit (upload), and once the client has spent its
    # rate limit (100) on oversized uploads, on the headers too: the API spools at most about the limit
    # per counted upload, never the 20-file batch limit per connection, and nothing for health
    assert set(r["answers"]) <= {"413", "429", "none"} and r["answers"].get("413"), r["answers"]
    assert r["api_written_mb"] < 1.2 * 100 + 5, r
    assert r["healthy_after"] and r["tmp_left"] == []


def test_chunked_flood_quick(service):
    check_chunked_flood(report("chunked-flood-quick", suites.chunked_flood(service, seconds=1.0, connections=2)))


@pytest.mark.slow
def test_chunked_flood_full(service):
    # issue 15's figure: 4 connections, 4.5 s, 1.5 GB spooled to deleted temp files
    check_chunked_flood(report("chunked-flood-full", suites.chunked_flood(service, seconds=4.5, connections=4)))
