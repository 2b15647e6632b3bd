"""Reading one tar shard sample by sample, through webdataset's own tar iterator and grouping.

The lowest layer above temper.data.io: temper.data.stream reads the planned samples of a
shard with `tar_samples`; temper.data.shards counts a shard's samples with `count_samples`
when no manifest lists them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from temper.data import io
from temper.errors import TemperError


def tar_samples(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar stream, through webdataset's own tar iterator and grouping."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def count_samples(url: str, *, options: io.IOOptions) -> int:
    """Samples in one shard, by reading it through (for shard lists without a manifest)."""
    try:
        with io.open_url(url, options=options) as stream:
            return sum(1 for _ in tar_samples(stream, url))
    except TemperError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile/network errors
        raise TemperError(f"data: {url} is not a readable tar shard ({type(e).__name__}: {e}); re-pack it") from e
