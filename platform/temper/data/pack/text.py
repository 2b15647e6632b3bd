"""`--format text`: a .txt/.md/.py/.jsonl file or a folder of them. Every text format
(`text`, `pystdlib`, `pystdlib-packages`) tokenizes with --tokenizer (default byte-level);
`token_source` turns documents into the fixed `tokens.npy` sequences of `text` and `pystdlib`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from temper.data.pack.source import PackOptions, Source, existing_path, permutation, source_name
from temper.errors import TemperError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")


def open_text(source: str, opts: PackOptions) -> Source:
    path = existing_path(source, "text")
    kinds = "/".join(TEXT_SUFFIXES)
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise TemperError(f"SOURCE {source} is not a {kinds} file; pass such a file or a folder of them")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise TemperError(f"SOURCE {source} has no {kinds} files; add some or pass another folder")
    return token_source(source_name(path.resolve().stem), str(path), files, opts)


def documents(path: Path) -> Iterator[str]:
    """A file's documents: the whole file, or each JSONL line's 'text' field."""
    if path.suffix.lower() != ".jsonl":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TemperError(
                    f"SOURCE {path}:{lineno} is not valid JSON ({e.msg}); write one JSON object per line"
                ) from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise TemperError(f"SOURCE {path}:{lineno} has no 'text' string field; add \"text\": \"...\"")
            yield record["text"]


def token_source(name: str, description: str, files: list[Path], opts: PackOptions) -> Source:
    """Documents (files in seeded order) -> tokens + EOS -> fixed seq_len + 1 sequences."""
    tok = opts.tokenizer
    assert tok is not None
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
    length = opts.seq_len + 1
    stats = {"documents": 0, "tokens": 0}

    def sequences() -> Iterator[dict[str, Any]]:
        pending: list[np.ndarray] = []
        buffered = emitted = 0
        for i in permutation(len(files), opts.seed):
            for doc in documents(files[i]):
                ids = tok.encode(doc)
                if ids.size == 0:
                    continue
                pending.append(np.append(ids, tok.eos_id).astype(dtype))
                buffered += ids.size + 1
                stats["documents"] += 1
                stats["tokens"] += ids.size + 1
                if buffered < length:
                    continue
                flat = np.concatenate(pending)
                cut = (len(flat) // length) * length
                for row in flat[:cut].reshape(-1, length):
                    yield {"tokens.npy": row.copy()}
                    emitted += 1
                    if opts.limit is not None and emitted >= opts.limit:
                        return
                pending, buffered = [flat[cut:]], len(flat) - cut

    extras = {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "seq_len": opts.seq_len,
              "tokenizer": tok.describe()}
    return Source(name, description, sequences(), extras, stats)
