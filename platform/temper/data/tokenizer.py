"""Tokenizers for packing text: byte-level (built in) or a local HF `tokenizers` JSON file.

Byte-level: token ids 0..255 are the UTF-8 bytes, 256 is end-of-text (vocab 257); it needs
no files and round-trips any text exactly. An HF tokenizer keeps its own ids; its
end-of-text token is the first of EOS_TOKENS it knows, else a new id equal to its vocab size.
A tokenizer describes itself as a JSON-able dict stored in the shard manifest, from which
`tokenizer_from_manifest` rebuilds it (the HF file is copied next to the shards).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from temper.errors import MissingDependencyError, TemperError

BYTE_EOS_ID = 256
BYTE_VOCAB_SIZE = 257
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
TOKENIZER_FILE = "tokenizer.json"  # the copy of an HF tokenizer inside a packed dataset


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: list[int] | np.ndarray) -> str: ...

    def describe(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus end-of-text 256."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {"kind": "bytes"}


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file; EOS from EOS_TOKENS or appended as a new id."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as e:
            raise MissingDependencyError("tokenizers", feature="--tokenizer FILE", extra="tokenizers") from e
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions on bad JSON
            raise TemperError(
                f"--tokenizer {path} is not a Hugging Face tokenizers JSON file ({e}); "
                "pass a tokenizer.json saved by `tokenizers` / `transformers`"
            ) from e
        self.path = path
        base = self._tok.get_vocab_size(with_added_tokens=True)
        known = [self._tok.token_to_id(t) for t in EOS_TOKENS]
        found = next((i for i in known if i is not None), None)
        self._eos_appended = found is None  # an id the HF tokenizer itself cannot decode
        self.eos_id = base if self._eos_appended else found
        self.vocab_size = base + 1 if self._eos_appended else base
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        keep = [int(i) for i in ids if not (self._eos_appended and int(i) == self.eos_id)]
        return self._tok.decode(keep, skip_special_tokens=False)

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "file": TOKENIZER_FILE, "source": str(self.path), "sha256": self.sha256}


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The byte-level tokenizer (None) or the HF tokenizer JSON at `path`."""
    if path is None:
        return ByteTokenizer()
    p = Path(path).expanduser()
    if not p.is_file():
        raise TemperError(
            f"--tokenizer {path} does not exist; pass a local tokenizer.json file, "
            "or leave --tokenizer out for the byte-level tokenizer"
        )
    return HFTokenizer(p)


def tokenizer_from_manifest(info: dict[str, Any], root: Path) -> Tokenizer:
    """Rebuild the tokenizer a manifest's `tokenizer` entry describes (HF file under `root`)."""
    if info.get("kind") == "hf":
        return HFTokenizer(root / info.get("file", TOKENIZER_FILE))
    return ByteTokenizer()
