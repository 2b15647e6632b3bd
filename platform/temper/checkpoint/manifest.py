"""What a committed checkpoint says about itself: manifest.json, and the selection result types."""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import asdict, dataclass, fields

from temper.errors import TemperError

FORMAT_VERSION = 1
ENGINES = ("dcp", "deepspeed")


@dataclass(frozen=True)
class CheckpointManifest:
    """manifest.json: written by rank 0 after every rank's files are complete."""

    format_version: int
    step: int
    engine: str  # "dcp" | "deepspeed"
    world_size: int
    mesh: dict | None
    spec_hash: str
    run_id: str | None
    data: dict | None  # the data loader cursor (JSON-able, the same on every rank)
    files: dict[str, int]  # relative path -> size in bytes (every file but manifest and marker)
    created: str
    temper_version: str
    extra: dict  # JSON-able meta from the caller (e.g. {"model": <model spec>})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = "manifest.json") -> CheckpointManifest:
        """Parse and check the fields; a bad manifest is a TemperError naming `where`."""
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(where, f"not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise _bad(where, "not a JSON object")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - raw.keys())
        if missing:
            raise _bad(where, f"missing {', '.join(missing)}")
        if not isinstance(raw["format_version"], int) or raw["format_version"] > FORMAT_VERSION:
            raise TemperError(
                f"{where}: format_version {raw['format_version']!r} is newer than this temper reads "
                f"({FORMAT_VERSION}); upgrade temper to load it"
            )
        if raw["engine"] not in ENGINES:
            raise _bad(where, f"engine {raw['engine']!r} is not one of {', '.join(ENGINES)}")
        for name in ("step", "world_size"):
            if not isinstance(raw[name], int) or raw[name] < 0:
                raise _bad(where, f"{name} {raw[name]!r} is not a non-negative integer")
        files = raw["files"]
        if not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, int) for k, v in files.items()):
            raise _bad(where, "files is not a {path: size} object")
        return cls(**{name: raw[name] for name in names})


def _bad(where: str, why: str) -> TemperError:
    return TemperError(
        f"{where} is not a temper checkpoint manifest: {why}; delete that step directory "
        "or point at another checkpoint"
    )


def build_manifest(*, step: int, engine: str, world_size: int, mesh: dict | None, spec_hash: str,
                   run_id: str | None, data: dict | None, files: dict[str, int],
                   extra: dict | None) -> CheckpointManifest:
    from temper import __version__

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest = CheckpointManifest(
        format_version=FORMAT_VERSION, step=step, engine=engine, world_size=world_size,
        mesh=mesh, spec_hash=spec_hash, run_id=run_id, data=data, files=dict(sorted(files.items())),
        created=created, temper_version=__version__, extra=dict(extra or {}),
    )
    json.dumps(asdict(manifest))  # fail here, not half-way through a commit, on non-JSON data
    return manifest


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class CommittedCheckpoint:
    path: str  # the step directory (local path or URL)
    manifest: CheckpointManifest

    @property
    def step(self) -> int:
        return self.manifest.step


@dataclass
class LoadedState:
    step: int
    manifest: CheckpointManifest
    rank_state: dict | None  # this rank's saved extra state; None if it was not in the saved world
    rank0_state: dict  # rank 0's saved extra state (always present)
