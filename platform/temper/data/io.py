"""Opening shard URLs: local paths, file://, http(s):// and s3://, through webdataset's gopen.

webdataset's `gopen` dispatches on the URL scheme through its `gopen_schemes` table. Its own
http handler pipes through `curl` with 30 retries (a missing shard takes a minute to fail)
and it has no s3 handler, so `register()` puts fsspec openers into that table for http,
https and s3. Every read, in the preflight, in `temper data inspect` and in the loader's
workers, then goes one way: `gopen(url)` -> a binary file read sequentially by webdataset's
tar iterator. HTTP is one streamed GET (never downloaded whole, no Range support needed);
S3 is read in `S3_BLOCK` ranged GETs with read-ahead, with the standard AWS credential chain
(environment, profile, instance role) and an optional endpoint for S3-compatible stores
(MinIO, Ceph, R2): `data.s3_endpoint_url` or `$AWS_ENDPOINT_URL_S3` / `$AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlparse

from temper.errors import MissingDependencyError, TemperError

REMOTE_SCHEMES = ("http", "https", "s3")
S3_BLOCK = 8 * 2**20


@dataclass(frozen=True)
class IOOptions:
    """How remote URLs are opened (picklable: it travels to the loader's worker processes)."""

    s3_endpoint_url: str | None = None
    timeout_s: float = 60.0

    def endpoint(self) -> str | None:
        return (self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))


def scheme(url: str) -> str:
    return urlparse(url).scheme if "://" in url else ""


def is_remote(url: str) -> bool:
    return scheme(url) in REMOTE_SCHEMES


def local_path(url: str) -> str:
    return url.removeprefix("file://")


def join(base: str, name: str) -> str:
    """`name` under the folder or URL prefix `base`."""
    return f"{base.rstrip('/')}/{name}"


def parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def expand(pattern: str) -> list[str]:
    """Brace patterns (`shards-{000000..000009}.tar`) and `::`-separated lists, as webdataset does."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(pattern))


def filesystem(url: str, options: IOOptions):
    """The fsspec filesystem for a remote URL (fsspec caches instances per arguments)."""
    import fsspec

    kind = scheme(url)
    if kind == "s3":
        try:
            import s3fs  # noqa: F401
        except ImportError as e:
            raise MissingDependencyError("s3fs", feature=f"reading {url}", extra="s3") from e
        endpoint = options.endpoint()
        return fsspec.filesystem(
            "s3", client_kwargs={"endpoint_url": endpoint} if endpoint else {},
            config_kwargs={"connect_timeout": options.timeout_s, "read_timeout": options.timeout_s,
                           "retries": {"max_attempts": 3}},
        )
    import aiohttp

    return fsspec.filesystem("http", client_kwargs={"timeout": aiohttp.ClientTimeout(
        total=None, sock_connect=options.timeout_s, sock_read=options.timeout_s)})


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, *, options: IOOptions | None = None,
                  size: int | None = None, **_: Any) -> IO[bytes]:
    options = options or IOOptions()
    fs = filesystem(url, options)
    try:
        if scheme(url) == "s3":
            return fs.open(url, "rb", block_size=S3_BLOCK, cache_type="readahead")
        return fs.open(url, "rb", block_size=0, size=size)  # one streamed GET
    except Exception as e:  # noqa: BLE001 - fsspec/aiohttp/botocore raise many types
        raise url_error(url, e, options) from e


def register() -> None:
    """Put our http(s)/s3 openers into webdataset's gopen dispatch table (idempotent)."""
    from webdataset.gopen import gopen_schemes

    for name in REMOTE_SCHEMES:
        gopen_schemes[name] = _gopen_fsspec


def open_url(url: str, *, options: IOOptions | None = None, size: int | None = None) -> IO[bytes]:
    """A binary stream of `url` via webdataset's gopen; errors name the URL and the fix."""
    from webdataset.gopen import gopen

    register()
    if not is_remote(url):
        check_scheme(url)
        try:
            return gopen(local_path(url), "rb")
        except OSError as e:
            raise url_error(url, e, options) from e
    return gopen(url, "rb", options=options or IOOptions(), size=size)


def check_scheme(url: str) -> None:
    kind = scheme(url)
    if kind not in ("", "file", *REMOTE_SCHEMES):
        raise TemperError(
            f"{url}: the scheme '{kind}://' is not supported; use a local path, file://, "
            "http(s):// or s3:// (mount other stores, or copy the shards)"
        )


def size_of(url: str, *, options: IOOptions | None = None) -> int:
    """Bytes at `url` (a stat, an HTTP HEAD, an S3 HEAD); an error naming the URL if absent."""
    options = options or IOOptions()
    check_scheme(url)
    try:
        if not is_remote(url):
            return os.stat(local_path(url)).st_size
        info = filesystem(url, options).info(url)
    except Exception as e:  # noqa: BLE001
        raise url_error(url, e, options) from e
    if info.get("size") is None:
        raise TemperError(f"{url}: the server did not report a size; serve it with Content-Length")
    return int(info["size"])


def read_bytes(url: str, *, options: IOOptions | None = None) -> bytes:
    with open_url(url, options=options) as f:
        try:
            return f.read()
        except Exception as e:  # noqa: BLE001
            raise url_error(url, e, options) from e


def exists(url: str, *, options: IOOptions | None = None) -> bool:
    try:
        size_of(url, options=options)
    except TemperError:
        return False
    return True


def url_error(url: str, error: BaseException, options: IOOptions | None) -> TemperError:
    """One line naming the URL, what went wrong, and what to do."""
    if isinstance(error, TemperError):
        return error
    name = type(error).__name__
    text = f"{error}".strip() or name
    if isinstance(error, FileNotFoundError) or "404" in text or "NoSuchKey" in text:
        if is_remote(url):
            return TemperError(
                f"{url} is missing or unreachable ({name}: {text}); check the URL, that the "
                "server is up, and that the shard was uploaded"
            )
        return TemperError(f"{url} does not exist; check data.train/data.eval and that the shards were packed")
    if isinstance(error, PermissionError) or "AccessDenied" in text or "403" in text:
        return TemperError(f"{url}: access denied ({text}); check the credentials and the bucket policy")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return TemperError(
            f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or run where an instance role is attached"
        )
    endpoint = options.endpoint() if options else None
    where = f" (endpoint {endpoint})" if scheme(url) == "s3" and endpoint else ""
    return TemperError(f"{url}{where} could not be read ({name}: {text}); check the URL and the network")
