"""`temper data pack` / `inspect`: every format, the manifest, verify(), and every input error."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import typer
import webdataset as wds

from temper.cli.data import data_app
from temper.data.inspection import inspect_lines
from temper.data.manifest import MANIFEST_NAME, Manifest, verify
from temper.data.pack import pack, parse_size
from temper.data.tokenizer import ByteTokenizer
from temper.errors import TemperError

DIGITS = 1797


def read_wds(out: Path) -> list[dict]:
    """All samples through plain webdataset (default decoders: .npy -> ndarray, cls -> int)."""
    manifest = Manifest.load(out)
    return list(wds.WebDataset(manifest.shard_urls(out), shardshuffle=False).decode())


def raises(match_exactly: str):
    """pytest.raises(TemperError) whose message must equal `match_exactly`."""
    return pytest.raises(TemperError, match=f"^{re.escape(match_exactly)}$")


def tokens_pack(tmp: Path, name: str = "tok", **kw) -> tuple[Path, Manifest]:
    out = tmp / name
    kw = {"limit": 10, "seq_len": 16, **kw}
    return out, pack("tokens", out, fmt="synthetic", **kw)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("digits") / "out"
    return out, pack("digits", out, fmt="digits", shard_size=500)


# ----------------------------------------------------------------------------------- formats


def test_digits_shards_match_the_manifest_and_read_with_webdataset_and_tar(digits) -> None:
    out, m = digits
    assert (m.format, m.num_samples, m.keys) == ("digits", DIGITS, {"cls": "int", "image.npy": "uint8[8,8]"})
    assert [(s.name, s.num_samples, s.first_index) for s in m.shards] == [
        ("digits-000000.tar", 500, 0), ("digits-000001.tar", 500, 500),
        ("digits-000002.tar", 500, 1000), ("digits-000003.tar", 297, 1500),
    ]
    assert m.extras["classes"] == [str(i) for i in range(10)] and m.extras["num_classes"] == 10
    for s in m.shards:
        data = (out / s.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s.bytes, s.sha256)
    assert Manifest.load(out / MANIFEST_NAME) == m and verify(out) == m
    samples = read_wds(out)
    assert len(samples) == DIGITS
    assert [s["__key__"] for s in samples] == [f"digits/{i:09d}" for i in range(DIGITS)]
    assert samples[0]["image.npy"].shape == (8, 8) and samples[0]["image.npy"].max() <= 16
    assert sorted({s["cls"] for s in samples}) == list(range(10))
    listing = subprocess.run(["tar", "-tf", str(out / m.shards[3].name)], capture_output=True, text=True, check=True)
    assert listing.stdout.split()[:2] == ["digits/000001500.cls", "digits/000001500.image.npy"]
    assert len(listing.stdout.split()) == 2 * 297


def test_pystdlib_with_limit_is_real_python_source(tmp_path) -> None:
    m = pack("pystdlib", tmp_path / "py", fmt="pystdlib", limit=12, seq_len=64, shard_size=5)
    assert (m.num_samples, [s.num_samples for s in m.shards]) == (12, [5, 5, 2])
    assert m.keys == {"tokens.npy": "uint16[65]"}
    assert (m.extras["vocab_size"], m.extras["eos_id"], m.extras["num_tokens"]) == (257, 256, 12 * 65)
    text = ByteTokenizer().decode(np.concatenate([s["tokens.npy"] for s in read_wds(tmp_path / "py")]))
    assert any(word in text for word in ("import ", "def ", "class "))


def write_corpus(root: Path) -> list[str]:
    """A text folder: .txt, .md, .jsonl (+ an ignored .csv); returns its documents."""
    docs = ["héllo wörld " * 3, "# Title\nmarkdown body", "first json doc", "second json doc 🙂"]
    root.mkdir()
    (root / "a.txt").write_text(docs[0])
    (root / "b.md").write_text(docs[1])
    lines = [json.dumps({"text": docs[2]}), "", json.dumps({"text": docs[3], "id": 7})]
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    (root / "ignored.csv").write_text("x,y\n1,2\n")
    return docs


def test_text_folder_cuts_eos_separated_documents_into_fixed_sequences(tmp_path) -> None:
    docs = write_corpus(tmp_path / "corpus")
    m = pack(str(tmp_path / "corpus"), tmp_path / "out", fmt="text", seq_len=7)
    total = sum(len(d.encode()) + 1 for d in docs)
    assert (m.num_samples, m.extras["documents"], m.keys) == (total // 8, 4, {"tokens.npy": "uint16[8]"})
    flat = np.concatenate([s["tokens.npy"] for s in read_wds(tmp_path / "out")]).tolist()
    pieces = [ByteTokenizer().decode(p) for p in _split(flat, 256)]
    assert all(p in docs for p in pieces[1:-1]) and len(pieces) >= 3  # whole docs between EOS


def _split(ids: list[int], sep: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    for i in ids:
        out.append([]) if i == sep else out[-1].append(i)
    return out


def test_byte_tokenizer_round_trips_text() -> None:
    tok, text = ByteTokenizer(), "ascii, ünïcödé, 日本語, emoji 🙂, \x00 and \n"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids) == text and tok.decode([*ids, 256]) == text


def test_hf_tokenizer_file_is_used_and_copied(tmp_path) -> None:
    tk = pytest.importorskip("tokenizers")
    hf = tk.Tokenizer(tk.models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    hf.train_from_iterator(["the cat sat on the mat"] * 20, tk.trainers.BpeTrainer(special_tokens=["[UNK]", "</s>"]))
    hf.save(str(tmp_path / "tok.json"))
    (tmp_path / "t.txt").write_text("the cat sat on the mat " * 20)
    m = pack(str(tmp_path / "t.txt"), tmp_path / "out", fmt="text", seq_len=4, tokenizer=str(tmp_path / "tok.json"))
    assert m.extras["tokenizer"]["kind"] == "hf" and m.extras["eos_id"] == hf.token_to_id("</s>")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert any(line.strip().startswith("text: 'the cat") for line in inspect_lines(str(tmp_path / "out")))


def test_npy_folder_with_labels_and_single_array(tmp_path) -> None:
    src = tmp_path / "arrays"
    src.mkdir()
    for i in range(5):
        np.save(src / f"x{i}.npy", np.full((2, 3), i, dtype=np.float32))
    np.save(src / "labels.npy", np.arange(5) % 2)
    m = pack(str(src), tmp_path / "out", fmt="npy")
    assert (m.num_samples, m.keys, m.extras["labels"]) == (5, {"cls": "int", "data.npy": "float32[2,3]"}, "labels.npy")
    assert all(s["cls"] == int(s["data.npy"][0, 0]) % 2 for s in read_wds(tmp_path / "out"))
    np.save(tmp_path / "rows.npy", np.arange(12, dtype=np.int64).reshape(4, 3))
    m = pack(str(tmp_path / "rows.npy"), tmp_path / "rows", fmt="npy", shard_size=3)
    assert (m.num_samples, len(m.shards), m.keys) == (4, 2, {"data.npy": "int64[3]"})


def test_imagefolder_copies_encoded_bytes(tmp_path) -> None:
    Image = pytest.importorskip("PIL.Image")
    originals = {}
    for cls, color in (("cat", 50), ("dog", 200)):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i, ext in enumerate(("png", "png", "jpg")):
            buf = io.BytesIO()
            Image.new("RGB", (6, 4), (color, i, 0)).save(buf, format="PNG" if ext == "png" else "JPEG")
            (tmp_path / "src" / cls / f"{i}.{ext}").write_bytes(buf.getvalue())
            originals[buf.getvalue()] = cls
    m = pack(str(tmp_path / "src"), tmp_path / "out", fmt="imagefolder")
    assert (m.num_samples, m.extras["classes"]) == (6, ["cat", "dog"])
    assert m.keys == {"cls": "int", "jpg": "image/jpeg", "png": "image/png"}
    raw = list(wds.WebDataset(m.shard_urls(tmp_path / "out"), shardshuffle=False))
    assert all(m.extras["classes"][int(s["cls"])] == originals[s.get("png", s.get("jpg"))] for s in raw)
    assert any("PNG 6x4 RGB -> uint8 (4, 6, 3)" in line for line in inspect_lines(str(tmp_path / "out")))


def test_synthetic_tokens_and_images(tmp_path) -> None:
    _, m = tokens_pack(tmp_path)
    assert (m.num_samples, m.keys, m.extras["vocab_size"]) == (10, {"tokens.npy": "uint16[17]"}, 257)
    m = pack("images", tmp_path / "img", fmt="synthetic", limit=4)
    assert m.keys == {"cls": "int", "image.npy": "float32[3,32,32]"} and len(read_wds(tmp_path / "img")) == 4


def test_packing_is_deterministic(tmp_path) -> None:
    a = tokens_pack(tmp_path, "a", seed=3)[1]
    b = tokens_pack(tmp_path, "b", seed=3)[1]
    c = tokens_pack(tmp_path, "c", seed=4)[1]
    assert a.shards == b.shards and a.shards[0].sha256 != c.shards[0].sha256


# ------------------------------------------------------------------------------- sharding


def test_shard_size_and_max_shard_bytes_split_shards(tmp_path) -> None:
    _, m = tokens_pack(tmp_path, "count", shard_size=3)
    assert [s.num_samples for s in m.shards] == [3, 3, 3, 1]
    assert [s.name for s in m.shards] == [f"synthetic-tokens-{i:06d}.tar" for i in range(4)]
    # one sample: a 512-byte header + 512 bytes of npy; a shard adds 1 KiB and pads to 10 KiB
    _, m = tokens_pack(tmp_path, "bytes", limit=40, max_shard_bytes=20480, prefix="b")
    assert [s.num_samples for s in m.shards] == [19, 19, 2]
    assert all(s.bytes <= 20480 for s in m.shards) and m.shards[0].name == "b-000000.tar"


def test_parse_size() -> None:
    assert [parse_size(s) for s in ("1000", "64MB", "1GiB", "512k")] == [1000, 64_000_000, 2**30, 512_000]
    with raises("--max-shard-bytes 'lots' is not a size; pass bytes or a unit, e.g. 268435456, 256MB, 1GiB"):
        parse_size("lots")


# --------------------------------------------------------------------------------- verify


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_verify_names_the_damaged_shard(tmp_path, damage) -> None:
    out, m = tokens_pack(tmp_path, shard_size=4)
    shard = out / m.shards[1].name
    data = shard.read_bytes()
    fix = "re-run `temper data pack` (or re-copy the shard)"
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
        expected = f"shard {shard} has {len(data) // 2} bytes, the manifest says {len(data)} (truncated?); {fix}"
    elif damage == "flip":
        shard.write_bytes(data[:700] + bytes([data[700] ^ 0xFF]) + data[701:])
        sha = hashlib.sha256(shard.read_bytes()).hexdigest()
        expected = f"shard {shard} sha256 {sha[:12]}... does not match the manifest (corrupted); {fix}"
    else:
        shard.unlink()
        expected = f"shard {shard} listed in {out / MANIFEST_NAME} is missing; {fix}"
    with raises(expected):
        verify(out)


# ---------------------------------------------------------------------------- bad input


def test_bad_arguments_fail_with_one_line_naming_the_fix(tmp_path) -> None:
    out = tmp_path / "out"
    cases = {
        "--format 'txt' is not a format; did you mean 'text'? accepted: digits, imagefolder, npy, pystdlib, pystdlib-packages, synthetic, text":
            lambda: pack("x", out, fmt="txt"),
        f"SOURCE {tmp_path}/nope does not exist; pass an existing file or folder for --format text":
            lambda: pack(str(tmp_path / "nope"), out, fmt="text"),
        "SOURCE 'mnist' is not accepted by --format digits; use SOURCE 'digits' (scikit-learn's bundled 8x8 digits) or pick --format text/npy/imagefolder for files":
            lambda: pack("mnist", out, fmt="digits"),
        "SOURCE 'token' is not a synthetic source; did you mean 'tokens'? accepted: tokens, images":
            lambda: pack("token", out, fmt="synthetic"),
        f"--tokenizer {tmp_path}/tok.json does not exist; pass a local tokenizer.json file, or leave --tokenizer out for the byte-level tokenizer":
            lambda: pack("pystdlib", out, fmt="pystdlib", tokenizer=str(tmp_path / "tok.json")),
        "--tokenizer applies to --format text or pystdlib or pystdlib-packages; drop it for --format digits":
            lambda: pack("digits", out, fmt="digits", tokenizer="tok.json"),
        "--shard-size 0 must be a positive integer; pass --shard-size 1 or more":
            lambda: pack("digits", out, fmt="digits", shard_size=0),
        "--prefix 'a.b' may hold only letters, digits, '_' and '-'; rename it":
            lambda: pack("digits", out, fmt="digits", prefix="a.b"),
    }
    for message, call in cases.items():
        with raises(message):
            call()
    assert not out.exists()


def test_bad_sources_fail_with_one_line_naming_the_fix(tmp_path, monkeypatch) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "cat" / "a.png").write_bytes(b"not a png")
    (tmp_path / "classes" / "dog").mkdir()
    (tmp_path / "short.txt").write_text("hi")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    out, kinds = tmp_path / "out", ".txt/.md/.py/.jsonl"
    cases = {
        f"SOURCE {tmp_path}/empty has no {kinds} files; add some or pass another folder": ("empty", "text"),
        f"SOURCE {tmp_path}/flat has no class subfolders; --format imagefolder expects SOURCE/<class>/<image>.png|jpg":
            ("flat", "imagefolder"),
        f"SOURCE class folder {tmp_path}/classes/dog has no .png/.jpg/.jpeg images; add images or remove the folder":
            ("classes", "imagefolder"),
        f"SOURCE {tmp_path}/short.txt holds 3 tokens, fewer than one sequence of --seq-len 256 + 1; lower --seq-len or add text":
            ("short.txt", "text"),
        f"SOURCE {tmp_path}/bad.jsonl:2 has no 'text' string field; add \"text\": \"...\"": ("bad.jsonl", "text"),
        f"SOURCE {tmp_path}/broken.jsonl:1 is not valid JSON (Expecting property name enclosed in double quotes); write one JSON object per line":
            ("broken.jsonl", "text"),
        f"SOURCE {tmp_path}/empty has no .npy files; pass a .npy array or a folder of .npy files": ("empty", "npy"),
    }
    for message, (name, fmt) in cases.items():
        with raises(message):
            pack(str(tmp_path / name), out, fmt=fmt)
    (tmp_path / "classes" / "dog" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with raises(f"SOURCE image {tmp_path}/classes/cat/a.png is not a PNG file (bad signature); fix or remove it"):
        pack(str(tmp_path / "classes"), out, fmt="imagefolder")
    monkeypatch.chdir(tmp_path)  # no ./digits folder here
    with raises("SOURCE digits does not exist; pass an existing file or folder for --format text, "
                "or --format digits for the built-in source"):
        pack("digits", out, fmt="text")
    assert not out.exists()  # nothing written, no partial shards left behind


def test_a_failed_pack_leaves_nothing_behind(tmp_path) -> None:
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(50)] + ["{oops"]
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    with raises(f"SOURCE {tmp_path}/big.jsonl:51 is not valid JSON (Expecting property name enclosed "
                "in double quotes); write one JSON object per line"):
        pack(str(tmp_path / "big.jsonl"), tmp_path / "out", fmt="text", seq_len=8, shard_size=5)
    assert not (tmp_path / "out").exists()  # the shards written before the error are gone too


def test_manifest_load_errors(tmp_path) -> None:
    with raises(f"{tmp_path}/manifest.json does not exist; pass a folder written by `temper data pack` "
                "or its manifest.json"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1')
    with raises(f"{tmp_path}/manifest.json is not valid JSON (Expecting ',' delimiter at line 1); "
                "re-run `temper data pack`"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 2, "format": "x"}')
    with raises(f"{tmp_path}/manifest.json lacks source, created, num_samples, keys, shards; "
                "re-run `temper data pack`"):
        Manifest.load(tmp_path)


def test_out_dir_is_never_overwritten_silently(tmp_path) -> None:
    out, first = tokens_pack(tmp_path, shard_size=2)  # 5 shards
    (out / "notes.txt").write_text("mine")
    with raises(f"OUT_DIR {out} is not empty (7 entries, e.g. manifest.json); pass an empty or new folder, "
                "or --overwrite to replace the shards in it"):
        tokens_pack(tmp_path)
    assert Manifest.load(out) == first
    _, second = tokens_pack(tmp_path, limit=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "synthetic-tokens-000000.tar"]
    assert verify(out) == second and second.num_samples == 3
    with raises(f"OUT_DIR {out / 'sub'} is inside SOURCE {out}; pass a folder outside the source"):
        pack(str(out), out / "sub", fmt="text")


# ------------------------------------------------------------------------------------- CLI


def run_cli(args: list[str]) -> None:
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    app(args=args, standalone_mode=False)


def test_cli_pack_and_inspect(tmp_path, capsys, digits) -> None:
    run_cli(["data", "pack", "tokens", str(tmp_path / "o"), "--format", "synthetic", "--limit", "6",
             "--seq-len", "8", "--shard-size", "4", "--max-shard-bytes", "1MiB"])
    assert "packed 6 samples into 2 shard(s)" in capsys.readouterr().err
    run_cli(["data", "inspect", str(digits[0]), "--verify"])
    err = capsys.readouterr().err
    for expected in ("verified   4 shard(s)", "shards     4", f"samples    {DIGITS}",
                     "keys       cls: int, image.npy: uint8[8,8]", "sample     digits/000000000",
                     "image.npy    uint8 (8, 8), min 0, max 16"):
        assert expected in err
    run_cli(["data", "inspect", str(tmp_path / "o" / "synthetic-tokens-000001.tar")])
    err = capsys.readouterr().err
    assert "shards     1 of 2" in err and "samples    2" in err and "sample     synthetic-tokens/000000004" in err
    shutil.copy(tmp_path / "o" / "synthetic-tokens-000000.tar", tmp_path / "bare.tar")
    run_cli(["data", "inspect", str(tmp_path / "bare.tar")])
    assert "samples    4" in capsys.readouterr().err
    with raises(f"URL {tmp_path}/missing does not exist; pass a folder written by `temper data pack`, "
                "its manifest.json, or a .tar shard"):
        run_cli(["data", "inspect", str(tmp_path / "missing")])
    with raises("gs://bucket/x: the scheme 'gs://' is not supported; use a local path, file://, "
                "http(s):// or s3:// (mount other stores, or copy the shards)"):
        run_cli(["data", "inspect", "gs://bucket/x"])
