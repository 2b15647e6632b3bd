"""Each rank's host heap: glibc malloc with a fixed mmap threshold (resources.malloc_mmap_threshold_kib).

glibc serves an allocation below its mmap threshold from the heap, and raises that threshold
(up to 32 MiB on 64-bit) each time a larger mapped block is freed. A training step allocates
and frees many tensors of a few MiB (gathered parameters, full gradients, reduce-scatter
buffers), so after the first free they all come from the heap, and the heap keeps the holes
they leave resident until a `malloc_trim`: at 729M parameters under FSDP on 2 CPU ranks,
0.8 GiB per rank above the live tensors (docs/parallelism.md, "Where the first steps' excess
is"). A fixed threshold turns that off: every block above it is its own mapping and goes back
to the OS when freed. Its price is fresh zeroed pages at every large allocation.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h; setting it also turns the dynamic threshold off
MAX_KIB = 32 * 1024  # glibc refuses a threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)


def fix_mmap_threshold(kib: int | None) -> bool:
    """Set glibc's mmap threshold to `kib` KiB in this process (None: leave glibc's dynamic
    default). True if it was set; False where the C library is not glibc (musl, macOS)."""
    if kib is None:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("not glibc: resources.malloc_mmap_threshold_kib has no effect here")
        return False
    if mallopt(M_MMAP_THRESHOLD, kib * 1024) != 1:
        raise ValueError(f"glibc refused an mmap threshold of {kib} KiB (at most {MAX_KIB})")
    return True
