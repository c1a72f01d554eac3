"""How the C heap treats image-sized buffers in a process that runs the
pipeline (a pool worker, ``imgworker process --local``).

Why: a decoded photo is tens of megabytes (a 3840x2160 picture is 33 MB in
Pillow's four bytes a pixel), and the pipeline allocates and frees several
such buffers per image. glibc serves blocks that big with a fresh mmap and
gives them back with munmap on free, so every image faults in (and the
kernel zeroes) all of its memory again: 20-30 ms of system CPU per 3840 px
photo, a tenth of its whole cost. :func:`keep_freed_memory` makes malloc
keep freed memory for the next image instead: it serves big blocks from the
heap and never trims it on its own (measured, ``imgworker process --local``
on four 3640-3840 px photos: 0.14-0.16 s of system CPU -> 0.07-0.09 s, user
CPU unchanged).

The price is that a process keeps the memory of its biggest image until it
calls :func:`release_freed_memory` (glibc's malloc_trim, which returns every
whole free page, wherever it sits in the heap). A worker does that when it
has waited a while for a job, and before it reports its RSS after a job that
left it big (see worker.py); a local run exits instead.

Elsewhere than glibc (musl, macOS) both calls do nothing.
"""

from __future__ import annotations

import ctypes
import functools

_M_TRIM_THRESHOLD = -1   # mallopt parameters, malloc.h
_M_MMAP_THRESHOLD = -3
# Past the largest buffer an image can need under the pixel limits (larger
# requests still get their own mapping), and the most mallopt accepts (int).
_BIG = 2**31 - 1


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


def keep_freed_memory() -> bool:
    """Make malloc keep freed image buffers for reuse (see the module doc).
    True when the allocator took the settings."""
    libc = _libc()
    if libc is None:
        return False
    # The order matters: setting either one also turns off glibc's dynamic
    # threshold, which would otherwise move them back as blocks come and go.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _BIG)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _BIG))


def release_freed_memory() -> bool:
    """Give every whole free page of the heap back to the system (the RSS
    drops to what is in use). True when memory was released."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))
