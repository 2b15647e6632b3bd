"""resources.malloc_mmap_threshold_kib: with glibc's threshold fixed, the memory a rank frees
leaves the process; with glibc's dynamic threshold, blocks of a few MiB freed after a larger
one stay resident in the heap (what made FSDP's first steps 1.26x their theory at 729M)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from temper.runtime.allocator import fix_mmap_threshold
from temper.spec import load_spec

# In a fresh process: free one 8 MiB block (glibc's dynamic threshold rises past 4 MiB), then
# touch 16 blocks of 4 MiB, free all but the last, and print how much stayed resident (MiB).
PROBE = """
import ctypes, sys
sys.path.insert(0, {platform!r})
from temper.runtime.allocator import fix_mmap_threshold
fix_mmap_threshold({kib})
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
libc.free(libc.malloc(8 << 20))
blocks = []
for _ in range(16):
    p = libc.malloc(4 << 20)
    ctypes.memset(p, 1, 4 << 20)
    blocks.append(p)
before = rss()
for p in blocks[:-1]:
    libc.free(p)
print(before - rss())
"""


def _freed_mib(kib) -> float:
    from tests.fixtures.cli import ROOT

    code = PROBE.format(platform=str(ROOT / "platform"), kib=kib)
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_a_fixed_threshold_returns_freed_blocks_and_the_dynamic_one_keeps_them() -> None:
    assert _freed_mib(1024) >= 55  # 15 x 4 MiB went back to the OS
    assert _freed_mib(None) <= 5  # they stayed in the heap


def test_the_default_and_the_bounds() -> None:
    from tests.fixtures.cli import TINY_GPT

    assert load_spec(TINY_GPT).resources.malloc_mmap_threshold_kib == 1024
    assert fix_mmap_threshold(None) is False
    with pytest.raises(Exception, match="malloc_mmap_threshold_kib"):
        load_spec(TINY_GPT, ["resources.malloc_mmap_threshold_kib=65536"])
