"""Test-only hook, loaded at start-up by the Python processes a test starts
with PYTHONPATH=tests/hooks and IMGWORKER_TEST_HOOKS=1 (see conftest.Service).

A job whose options carry ``_testSleepMs`` makes its worker sleep that long
before processing: a stand-in for a decode stuck in C code.
IMGWORKER_TEST_SLEEP_MS does the same for every job without that option
(jobs uploaded through the API, which never stores options starting with
``_``), for a test that must see a batch while it runs. ``_testHoldMb``
makes the worker keep that many MB allocated for the rest of its life: a
stand-in for the address space a worker holds after its jobs (memory the
heap keeps, holes malloc_trim cannot return). Production code has no such
hook: it exists only in the processes tests start.
"""

import os

if os.environ.get("IMGWORKER_TEST_HOOKS") == "1":
    import time

    import imgworker.imaging as _imaging

    _process = _imaging.process
    _held = []

    def _process_with_sleep(src, out_dir, job_id, options, limits):
        if options.get("_testHoldMb"):
            _held.append(bytearray(options["_testHoldMb"] * 2**20))
        delay = options.get("_testSleepMs") or int(os.environ.get("IMGWORKER_TEST_SLEEP_MS") or 0)
        if delay:
            time.sleep(delay / 1000)
        return _process(src, out_dir, job_id, {k: v for k, v in options.items() if not k.startswith("_")}, limits)

    _imaging.process = _process_with_sleep

    if os.environ.get("IMGWORKER_TEST_WRITE_WAIT_S"):
        # a held lock refuses writes after this long instead of 15 s (the
        # database-locked tests: the same code path, minutes shorter)
        import imgworker.db as _db

        _db.WRITE_WAIT_S = float(os.environ["IMGWORKER_TEST_WRITE_WAIT_S"])
        _db.BUSY_TIMEOUT_MS = min(_db.BUSY_TIMEOUT_MS, int(_db.WRITE_WAIT_S * 1000))
