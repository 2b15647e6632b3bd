"""Loader throughput: Temper's webdataset loader vs a raw sequential `tarfile` read of the same
shards, measured in one run.

Readers, each timed over one epoch of the same shards, interleaved round by round (so load
from other processes hits them alike), best of --repeats:

  raw tarfile        the baseline: `tarfile.open(fileobj=f, mode="r|")` over every shard in
                     order, `extractfile(m).read()` of every member, samples counted by key
                     (the name up to the first dot after the last slash, as WebDataset groups).
  temper no decode   Temper's real training path, `ShardedData.train_batches()` with
                     data.num_workers=0 (plan, `read_slice` through webdataset's tar iterator,
                     shuffle-window delivery, substitution bookkeeping, collation), with the
                     decoder swapped for `RawFields`, a pass-through that hands each batch
                     field's bytes on (no np.load, no tensors; bytes collate into lists).
                     Goal: temper no decode / raw tarfile >= 0.9.
  plain wds          reference: `webdataset.WebDataset(urls).decode()` + numpy->torch +
                     torch's default_collate, in-process (what a hand-written pipeline with
                     the same decode costs).
  temper decode w=2  `ShardedData.train_batches()` with the real decoder and
                     data.num_workers=2: samples/s over one epoch (DataLoader start included)
                     and time to first batch (from `train_batches()` to the first batch in hand).

Transport: both readers of the ratio open a shard the same way. Local shards: the raw reader
uses `open(path, "rb")`, the loader webdataset's `gopen`, which is `open(path, "rb",
buffering=8192)`. With --http the shards are served by a real `python -m http.server` on
127.0.0.1 (started and stopped here), and the raw reader opens each shard with
`temper.data.io.open_url`, the loader's own opener (one streamed fsspec/aiohttp GET per shard).

Printed per reader: samples, best wall seconds, samples/s, samples per CPU-second of this
process (in-process readers only; it moves less than wall time when other processes load
the machine) and, for the loader, the best time to first batch. Then the ratio temper no
decode / raw tarfile by both clocks, with the raw read's cost per sample and what the loader
adds to it.

    .venv/bin/python benchmarks/data_loader.py [--samples 20000] [--repeats 3] [--http]
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from temper.data import io as dio  # noqa: E402
from temper.data.pack import pack  # noqa: E402
from temper.data.shards import resolve_shards  # noqa: E402
from temper.data.webdataset import ShardedData, build_webdataset_data  # noqa: E402
from temper.spec.job import JobSpec  # noqa: E402

BATCH = 64
SHUFFLE = 1000


@dataclass(frozen=True)
class RawFields:
    """Decoder stand-in: each batch field's raw bytes, as read from the tar (no decoding)."""

    fields: dict[str, str]

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {name: raw[key] for name, key in self.fields.items()}


def open_raw(url: str):
    """The raw reader's transport: open() locally, the loader's own opener over HTTP."""
    return dio.open_url(url) if dio.is_remote(url) else open(dio.local_path(url), "rb")


def raw_tarfile(urls: list[str]) -> int:
    samples = 0
    for url in urls:
        with open_raw(url) as f:
            tar = tarfile.open(fileobj=f, mode="r|")
            key = None
            for member in tar:
                if not member.isfile():
                    continue
                tar.extractfile(member).read()
                name = member.name
                dot = name.find(".", name.rfind("/") + 1)
                k = name[:dot] if dot >= 0 else name
                if k != key:
                    samples, key = samples + 1, k
    return samples


def plain_wds(urls: list[str]) -> int:
    import webdataset as wds

    dio.register()
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    n, chunk = 0, []
    for sample in ds:
        chunk.append({"image": torch.from_numpy(sample["image.npy"]), "label": torch.tensor(sample["cls"])})
        if len(chunk) == BATCH:
            default_collate(chunk)
            n, chunk = n + BATCH, []
    return n


def sharded_data(source: str, *, num_workers: int) -> ShardedData:
    spec = JobSpec.model_validate({
        "name": "bench", "model": {"kind": "resnet", "flavor": "tiny", "image_size": 32},
        "data": {"kind": "webdataset", "train": source, "num_workers": num_workers, "shuffle_buffer": SHUFFLE},
        "train": {"micro_batch_size": BATCH}, "tracking": {"enabled": False},
    })
    return build_webdataset_data(spec, rank=0, world_size=1)


@dataclass(frozen=True)
class Pass:
    """One timed epoch: samples, seconds to the first batch (loader only), wall and CPU seconds
    (CPU: this process, all its threads, so fsspec's I/O thread counts too)."""

    samples: int
    first: float | None
    wall: float
    cpu: float


def temper_epoch(data: ShardedData) -> Pass:
    """One epoch of `train_batches()`, timed from the call (the first batch includes starting
    the loader, its workers and filling their shuffle windows)."""
    t0, c0 = time.perf_counter(), time.process_time()
    batches = data.train_batches()
    n = len(next(batches)["label"])
    first = time.perf_counter() - t0
    for _ in range(data.batches_per_epoch - 1):
        n += len(next(batches)["label"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    batches.close()  # stops the loader's worker processes
    return Pass(n, first, wall, cpu)


def timed(fn: Callable[[], int]) -> Callable[[], Pass]:
    def run() -> Pass:
        t0, c0 = time.perf_counter(), time.process_time()
        n = fn()
        return Pass(n, None, time.perf_counter() - t0, time.process_time() - c0)

    return run


def temper_no_decode(source: str) -> Callable[[], Pass]:
    def run() -> Pass:
        data = sharded_data(source, num_workers=0)
        data.decoder = RawFields(dict(data.decoder.fields))
        return temper_epoch(data)

    return run


def temper_decode(source: str, workers: int) -> Callable[[], Pass]:
    return lambda: temper_epoch(sharded_data(source, num_workers=workers))


@dataclass
class Reader:
    name: str
    run: Callable[[], Pass]
    in_process: bool = True  # False: the work runs in loader workers, this process's CPU time says nothing
    passes: list[Pass] = field(default_factory=list)

    def best(self, what: str) -> float:
        return min(getattr(p, what) for p in self.passes)

    def rate(self, what: str = "wall") -> float:
        return self.passes[-1].samples / self.best(what)


def measure(source: str, repeats: int, label: str) -> None:
    urls = list(resolve_shards(source, options=dio.IOOptions()).urls)
    readers = [
        Reader("raw tarfile", timed(lambda: raw_tarfile(urls))),
        Reader("temper no decode", temper_no_decode(source)),
        Reader("plain wds", timed(lambda: plain_wds(urls))),
        Reader("temper decode w=2", temper_decode(source, 2), in_process=False),
    ]
    raw_tarfile(urls)  # warm-up: page cache, imports, the HTTP server's first answers
    for r in range(repeats):
        for reader in readers[r % 2:] + readers[:r % 2]:  # alternate who goes first
            reader.passes.append(reader.run())
    for reader in readers:
        cpu = f"{reader.rate('cpu'):>8.0f}" if reader.in_process else f"{'-':>8}"
        first = f"  first batch {reader.best('first') * 1000:4.0f} ms" if reader.passes[0].first is not None else ""
        print(f"  {label:<6} {reader.name:<18} {reader.passes[-1].samples:>6} samples  {reader.best('wall'):6.3f} s "
              f"{reader.rate():>8.0f} samples/s  {cpu} per CPU-s{first}")
    raw, temper = readers[0], readers[1]
    for what, unit in (("wall", "samples/s"), ("cpu", "per CPU-s")):
        r, t = raw.rate(what), temper.rate(what)
        print(f"  {label:<6} temper no decode / raw tarfile, {unit:<9}  {t / r:.3f}  (goal >= 0.9; "
              f"{1e6 / r:.1f} us/sample raw, loader {1e6 / t - 1e6 / r:+.1f} us/sample)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--http", action="store_true", help="also read over a local HTTP server")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        manifest = pack("images", folder, fmt="synthetic", limit=args.samples, shard_size=2000)
        print(f"{manifest.num_samples} synthetic 3x32x32 float32 images in {len(manifest.shards)} shards "
              f"({manifest.total_bytes / 2**20:.0f} MiB), batch {BATCH}, shuffle window {SHUFFLE}, "
              f"best of {args.repeats}")
        measure(str(folder), args.repeats, "local")
        if args.http:
            sys.path.insert(0, str(ROOT / "tests"))
            from tests.fixtures.shard_servers import HttpShardServer

            server = HttpShardServer(Path(tmp))
            try:
                measure(f"{server.url}/images", args.repeats, "http")
            finally:
                server.stop()


if __name__ == "__main__":
    main()
