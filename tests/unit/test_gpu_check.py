"""The CPU-side parts of `make gpu-check` (benchmarks/gpu_check.py): its arguments, its
summary table, and its refusal on a machine without CUDA. The GPU parts run only there."""

from __future__ import annotations

import pytest
import torch
from benchmarks.gpu_check import Row, main, parse_args, render_table


def test_arguments_and_their_errors(tmp_path, capsys) -> None:
    args = parse_args([])
    assert args.steps == 20 and args.out.name == "gpu-check.md" and not args.skip_tests
    args = parse_args(["--steps", "5", "--out", str(tmp_path / "t.md"), "--skip-tests"])
    assert args.steps == 5 and args.out == tmp_path / "t.md" and args.skip_tests
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--steps", "1"])
    assert exit_.value.code == 2 and "--steps must be at least 2" in capsys.readouterr().err


def test_summary_table_has_one_row_per_check() -> None:
    rows = [Row("tests/gpu", "ok", "12 passed", 61.4), Row("resnet-50", "FAILED", "OOM", 3.0)]
    table = render_table(rows, device="NVIDIA H200")
    lines = table.splitlines()
    assert lines[0] == "# GPU check on NVIDIA H200"
    assert lines[2] == "| check | result | figure | seconds |" and lines[3].startswith("| --- |")
    assert lines[4:] == ["| tests/gpu | ok | 12 passed | 61 |", "| resnet-50 | FAILED | OOM | 3 |"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "t.md")])
    assert "needs a CUDA GPU" in str(exit_.value.code) and not (tmp_path / "t.md").exists()
