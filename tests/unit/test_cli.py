"""The `temper` command: exit codes, one-line errors without tracebacks, schema output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from temper.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "jobs" / "quickstart.yaml")


def test_validate_ok(capsys) -> None:
    assert main(["validate", QUICKSTART, "--set", "resources.workers=4"]) == 0
    err = capsys.readouterr().err
    assert "ok: quickstart: model gpt, objective causal_lm, strategy ddp, 4 worker(s), global batch 64" in err


def test_validate_print_shows_resolved_spec(capsys) -> None:
    assert main(["validate", QUICKSTART, "--print"]) == 0
    out = capsys.readouterr().out
    assert "n_layer: 2" in out and "objective:\n  kind: causal_lm" in out


def test_schema_is_json_schema(capsys) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "JobSpec" and "model" in schema["required"]


def test_console_script_bad_spec_exit_2_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {kind: gpt, n_layerz: 2}\noptim: {lr: -1}\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "temper"), "run", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: {bad}: model.n_layerz: unknown key (did you mean 'n_layer'?); accepted: d_model, "
        "dropout, flavor, kind, mlp_ratio, n_head, n_layer, num_classes, seq_len, tie_embeddings, vocab_size",
        f"error: {bad}: optim.lr: input should be greater than 0 (got -1)",
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", QUICKSTART, "--launcher", "slurm"],
         "error: --launcher 'slurm' is not known; accepted: ray, torchrun, inprocess"),
        (["run", QUICKSTART, "--launcher", "inprocess"],
         "error: resources.workers: --launcher inprocess runs exactly 1 worker, got 2; set "
         "resources.workers=1 or use --launcher torchrun"),
        (["run", QUICKSTART, "--launcher", "torchrun", "--address", "1.2.3.4:6379"],
         "error: --address only applies to --launcher ray, not --launcher torchrun"),
        (["validate", "missing.yaml"], "error: missing.yaml: file not found; check the path to the job spec"),
    ],
)
def test_user_errors_exit_2(capsys, argv, message) -> None:
    assert main([*argv, "--set", "tracking.enabled=false"]) == 2
    assert capsys.readouterr().err.strip() == message


def test_unknown_option_is_a_usage_error(capsys) -> None:
    assert main(["run", QUICKSTART, "--nope"]) == 2
    assert "No such option: --nope" in capsys.readouterr().err


class _FinishedJob:
    """A submit target whose job has ended (the Jobs API's state and message, verbatim form)."""

    def __init__(self, state: str, message: str, log: str) -> None:
        from temper.launch.submit.base import JobStatus

        self.st = JobStatus(job_id="j1", state=state, message=message)
        self.log = log

    def logs(self, job_id: str, *, follow: bool = False):
        yield self.log

    def status(self, job_id: str):
        return self.st


@pytest.mark.parametrize(("state", "message", "code"), [
    ("FAILED", "Job entrypoint command failed with exit code 2, last available logs ...", 2),
    ("FAILED", "Job entrypoint command failed with exit code 1, last available logs ...", 1),
    ("STOPPED", "Job was intentionally stopped.", 1),
])
def test_submit_follow_exits_with_the_drivers_code(capsys, state, message, code) -> None:
    """`submit --follow` ends as `temper run` would: 2 for an input error, 1 otherwise, and the
    driver's error line last."""
    import typer

    from temper.cli.cluster import _follow

    job = _FinishedJob(state, message, "step 1/3\nerror: data.train: no shards under /x; fix it\n")
    with pytest.raises(typer.Exit) as exit_:
        _follow(job, "j1")
    assert exit_.value.exit_code == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: data.train: no shards under /x; fix it"


def test_submit_follow_of_a_finished_job_exits_0(capsys) -> None:
    from temper.cli.cluster import _follow

    _follow(_FinishedJob("SUCCEEDED", "Job finished successfully.", "finished\n"), "j1")
    assert "job j1 SUCCEEDED" in capsys.readouterr().err
