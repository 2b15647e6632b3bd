"""Run files (figures) staged on disk and uploaded in order by the tracker's thread."""

from __future__ import annotations

import pytest

from temper.tracking.artifacts import ArtifactOutbox, check_artifact_path


def test_files_upload_in_order_and_survive_a_failure_and_a_restart(tmp_path) -> None:
    box = ArtifactOutbox(tmp_path / "stage")
    box.add("eval/step-000010/confusion_matrix.png", b"png-1")
    box.add("eval/step-000010/confusion_matrix.json", b"{}")
    box.add("eval/step-000020/confusion_matrix.png", b"png-2")
    uploaded: list[tuple[str, str | None, bytes]] = []
    calls = {"n": 0}

    def flaky(local: str, folder: str | None) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("server down")
        uploaded.append((local.rsplit("/", 1)[-1], folder, open(local, "rb").read()))

    with pytest.raises(ConnectionError):
        box.send(flaky)
    assert box.pending == 2 and len(uploaded) == 1
    again = ArtifactOutbox(tmp_path / "stage")  # a new process finds what is left on disk
    assert again.pending == 2
    box.send(flaky)
    assert [(n, f) for n, f, _ in uploaded] == [
        ("confusion_matrix.png", "eval/step-000010"), ("confusion_matrix.json", "eval/step-000010"),
        ("confusion_matrix.png", "eval/step-000020")]
    assert uploaded[2][2] == b"png-2" and box.pending == 0
    assert not [p for p in (tmp_path / "stage").rglob("*") if p.is_file()]


def test_a_refused_file_is_dropped_not_retried_forever(tmp_path) -> None:
    box = ArtifactOutbox(tmp_path)
    box.add("a.png", b"x")
    box.add("b.png", b"y")
    sent = []

    def refuse_a(local: str, folder: str | None) -> None:
        if local.endswith("a.png"):
            raise ValueError("INVALID_PARAMETER_VALUE")
        sent.append(local)

    box.send(refuse_a, refused=lambda e: isinstance(e, ValueError))
    assert box.pending == 0 and [s.rsplit("/", 1)[-1] for s in sent] == ["b.png"] and box.sent == 1


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x.png", "eval/../../x"])
def test_artifact_paths_stay_inside_the_run(bad) -> None:
    with pytest.raises(ValueError):
        check_artifact_path(bad)
