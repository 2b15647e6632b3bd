"""Loader throughput: Temper's webdataset loader vs reading the same tar shards raw, in one run.

Three readers over the same shards, one process each pass (num_workers=0, so the numbers
compare the per-sample cost, not parallelism), best of --repeats:

  raw tar     webdataset's tar iterator + group_by_keys over every shard: bytes only, no
              decode. The I/O floor.
  plain wds   `webdataset.WebDataset(urls).decode()` + numpy->torch + torch's default_collate:
              what a hand-written pipeline with the same decode costs.
  temper      `ShardedData.train_batches()` for one epoch: the plan, shuffle window, decode,
              substitution bookkeeping and collation.

Printed: samples/s of each and the ratios temper/raw and temper/plain. With --http the same
three run against a real `python -m http.server` on 127.0.0.1.

    .venv/bin/python benchmarks/data_loader.py [--samples 20000] [--http]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from temper.data import io as dio  # noqa: E402
from temper.data.pack import pack  # noqa: E402
from temper.data.shards import resolve_shards  # noqa: E402
from temper.data.stream import _tar_samples  # noqa: E402
from temper.data.webdataset import build_webdataset_data  # noqa: E402
from temper.spec.models import JobSpec  # noqa: E402

BATCH = 64


def raw_tar(urls: list[str]) -> int:
    n = 0
    for url in urls:
        with dio.open_url(url) as stream:
            for sample in _tar_samples(stream, url):
                n += len(sample) > 0
    return n


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


def temper_loader(source: str, image_size: int) -> int:
    spec = JobSpec.model_validate({
        "name": "bench", "model": {"kind": "resnet", "flavor": "tiny", "image_size": image_size},
        "data": {"kind": "webdataset", "train": source, "num_workers": 0, "shuffle_buffer": 1000},
        "train": {"micro_batch_size": BATCH}, "tracking": {"enabled": False},
    })
    data = build_webdataset_data(spec, rank=0, world_size=1)
    n = 0
    batches = data.train_batches()
    for _ in range(data.batches_per_epoch):
        n += len(next(batches)["label"])
    return n


def best(fn, repeats: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t)
    return min(times), n


def measure(source: str, repeats: int, label: str) -> None:
    urls = list(resolve_shards(source, options=dio.IOOptions()).urls)
    rows = {}
    for name, fn in (("raw tar", lambda: raw_tar(urls)), ("plain wds", lambda: plain_wds(urls)),
                     ("temper", lambda: temper_loader(source, 32))):
        seconds, n = best(fn, repeats)
        rows[name] = n / seconds
        print(f"  {label:<6} {name:<10} {n:>7} samples  {seconds:7.3f} s  {n / seconds:>10.0f} samples/s")
    print(f"  {label:<6} ratio temper/raw tar   {rows['temper'] / rows['raw tar']:.3f}")
    print(f"  {label:<6} ratio temper/plain wds {rows['temper'] / rows['plain wds']:.3f}")


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
              f"({manifest.total_bytes / 2**20:.0f} MiB), batch {BATCH}, best of {args.repeats}")
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
