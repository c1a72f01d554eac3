"""Test-only hook, loaded at start-up by the Python processes a test starts
with PYTHONPATH=tests/hooks and IMGWORKER_TEST_HOOKS=1 (see conftest.Service).

A job whose options carry ``_testSleepMs`` makes its worker sleep that long
before processing: a stand-in for a decode stuck in C code. The API never
stores options starting with ``_``, and production code has no such hook:
it exists only in the processes tests start.
"""

import os

if os.environ.get("IMGWORKER_TEST_HOOKS") == "1":
    import time

    import imgworker.imaging as _imaging

    _process = _imaging.process

    def _process_with_sleep(src, out_dir, job_id, options, limits):
        delay = options.get("_testSleepMs")
        if delay:
            time.sleep(delay / 1000)
        return _process(src, out_dir, job_id, {k: v for k, v in options.items() if not k.startswith("_")}, limits)

    _imaging.process = _process_with_sleep
