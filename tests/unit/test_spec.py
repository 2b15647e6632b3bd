"""Job spec: loading, defaults, overrides typed by the schema, and exact error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from temper.errors import SpecError
from temper.spec import JobSpec, load_spec, spec_from_json, spec_hash, spec_to_json
from temper.spec.loader import apply_overrides, flatten, spec_to_dict

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


def write(tmp_path: Path, data, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def problems(path: Path, overrides=()) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path, list(overrides))
    return info.value.problems


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_validates(job: Path) -> None:
    from temper.spec.loader import read_yaml
    from temper.spec.pipeline import is_pipeline_file, load_pipeline

    if is_pipeline_file(read_yaml(job)):  # a pipeline: the file and every stage's job
        pipeline = load_pipeline(job)
        for stage in pipeline.stages:
            assert isinstance(load_spec(job.parent / stage.job), JobSpec)
        return
    from temper.spec.tune import is_space_file, load_space

    if is_space_file(read_yaml(job)):  # a `temper tune` space file (its keys: tests/unit/test_tune_space.py)
        assert load_space(job).space
        return
    spec = load_spec(job)
    assert isinstance(spec, JobSpec)


def test_fixed_key_names_exist() -> None:
    spec = load_spec(QUICKSTART)
    fixed = ["name", "seed", "model.kind", "data", "strategy.kind", "optim.lr", "train.max_steps",
             "train.grad_accum", "train.log_every", "train.eval_every", "resources.workers",
             "resources.gpus_per_worker", "tracking.uri", "tracking.experiment"]
    data = spec_to_dict(spec)
    for dotted in fixed:
        node = data
        for part in dotted.split("."):
            assert part in node, dotted
            node = node[part]


def test_defaults_and_flavor() -> None:
    spec = load_spec(QUICKSTART)
    assert spec.model.kind == "gpt" and spec.model.n_layer == 2 and spec.model.d_model == 64
    assert spec.objective.kind == "causal_lm"  # the model's natural objective
    assert spec.global_batch_size == 16 * 1 * 2


def test_flavor_keys_can_be_overridden(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "x", "model": {"kind": "gpt", "flavor": "small", "n_layer": 3}})
    spec = load_spec(path)
    assert spec.model.n_layer == 3 and spec.model.d_model == 768


def test_overrides_are_typed_by_the_schema() -> None:
    spec = load_spec(QUICKSTART, ["train.max_steps=50", "optim.lr=1e-3", "resources.workers=1",
                                  "optim.grad_clip=null", "tracking.experiment=123",
                                  "tracking.uri=on"])
    assert spec.train.max_steps == 50 and isinstance(spec.train.max_steps, int)
    assert spec.optim.lr == pytest.approx(1e-3)
    assert spec.optim.grad_clip is None
    assert spec.tracking.experiment == "123"  # a string field keeps the raw text
    assert spec.tracking.uri == "on"  # not YAML's boolean


def test_override_creates_missing_sections(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "x", "model": {"kind": "resnet"}})
    spec = load_spec(path, ["strategy.bucket_cap_mb=50", "data.noise=0.5"])
    assert spec.strategy.kind == "ddp" and spec.strategy.bucket_cap_mb == 50
    assert spec.data.kind == "synthetic" and spec.data.noise == 0.5
    assert spec.objective.kind == "classify"


def test_override_does_not_mutate_input() -> None:
    data = {"train": {"max_steps": 3}}
    new, touched = apply_overrides(data, ["train.max_steps=4"])
    assert data["train"]["max_steps"] == 3 and new["train"]["max_steps"] == 4
    assert touched == {"train.max_steps"}


WEBDATASET = {"name": "wds", "model": {"kind": "gpt", "flavor": "tiny"},
              "data": {"kind": "webdataset", "train": "/shards/train", "eval": "/shards/eval"}}


@pytest.mark.parametrize("null", ["null", "~", "NULL", "Null"])
def test_set_null_clears_an_optional_string_key(tmp_path: Path, null: str) -> None:
    path = write(tmp_path, WEBDATASET)
    spec = load_spec(path, [f"data.eval={null}"])
    assert spec.data.eval is None  # was the folder "null"
    assert spec_to_dict(spec)["data"]["eval"] is None


def test_set_null_clears_optional_sections_and_keys_with_a_default(tmp_path: Path) -> None:
    path = write(tmp_path, {**WEBDATASET, "init_from": "/ckpt/run-1", "checkpoint": {"dir": "/ckpt"}})
    assert load_spec(path).init_from.source == "/ckpt/run-1"
    spec = load_spec(path, ["init_from=null", "checkpoint.dir=null", "optim.grad_clip=null",
                            "cluster.image_pull_policy=null", "objective=null"])
    assert spec.init_from is None and spec.checkpoint.dir is None
    assert spec.optim.grad_clip is None  # null, not back to the default 1.0
    assert spec.cluster.image_pull_policy is None
    assert spec.objective.kind == "causal_lm"  # null objective: the model's natural one


def test_quoted_null_stays_text(tmp_path: Path) -> None:
    path = write(tmp_path, WEBDATASET)
    spec = load_spec(path, ['data.eval="null"', "tracking.experiment='~'", 'name="null"',
                            'tracking.uri=x"y"'])
    assert spec.data.eval == "null" and spec.tracking.experiment == "~" and spec.name == "null"
    assert spec.tracking.uri == 'x"y"'  # only a wholly quoted value loses its quotes
    assert load_spec(path, ["init_from='null'"]).init_from.source == "null"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=null",
         "--set train.max_steps=null: train.max_steps cannot be null (it is not optional); "
         "give an integer (default 100)"),
        ("train.precision=~",
         "--set train.precision=~: train.precision cannot be null (it is not optional); "
         "give one of 'fp32', 'bf16' (default 'fp32')"),
        ("name=null", "--set name=null: name cannot be null (it is required); give a string"),
        ("strategy=null",
         "--set strategy=null: strategy cannot be null (it is not optional); "
         "give a section (kind: ddp, fsdp, deepspeed)"),
    ],
)
def test_set_null_on_a_key_that_cannot_be_null_is_one_line(override: str, expected: str) -> None:
    assert problems(QUICKSTART, [override]) == [expected]


def test_set_null_on_an_unknown_key_still_says_unknown_key() -> None:
    assert problems(QUICKSTART, ["data.eval=null"]) == [
        "--set: data.eval: unknown key; accepted: eval_samples, kind, noise, num_samples, num_workers"]


def test_validate_print_shows_the_cleared_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from temper.cli import main

    path = str(write(tmp_path, WEBDATASET))
    assert main(["validate", path, "--set", "data.eval=null", "--print"]) == 0
    assert "\n  eval: null\n" in capsys.readouterr().out
    assert main(["validate", path, "--set", "train.max_steps=null"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --set train.max_steps=null: train.max_steps cannot be null (it is not optional); "
        "give an integer (default 100)")


def test_spec_round_trips_through_json_and_hash_is_stable() -> None:
    spec = load_spec(QUICKSTART)
    again = spec_from_json(spec_to_json(spec))
    assert again == spec and spec_hash(again) == spec_hash(spec)
    assert spec_hash(load_spec(QUICKSTART, ["seed=1"])) != spec_hash(spec)


def test_spec_is_frozen() -> None:
    spec = load_spec(QUICKSTART)
    with pytest.raises(ValidationError):
        spec.train.max_steps = 3  # type: ignore[misc]


def test_flatten_gives_dotted_string_params() -> None:
    flat = flatten(spec_to_dict(load_spec(QUICKSTART)))
    assert flat["optim.lr"] == "0.003" and flat["model.kind"] == "gpt"
    assert flat["optim.betas"] == "[0.9, 0.95]" and flat["tracking.uri"] == "null"


BASE = {"name": "bad", "model": {"kind": "gpt"}}


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"model": {"kind": "gpt", "n_layerz": 2}},
         "model.n_layerz: unknown key (did you mean 'n_layer'?); accepted: d_model, dropout, "
         "flavor, kind, mlp_ratio, n_head, n_layer, num_classes, seq_len, tie_embeddings, vocab_size"),
        ({"trian": {}},
         "trian: unknown key (did you mean 'train'?); accepted: checkpoint, cluster, data, fault, init_from, model, name, "
         "objective, optim, resources, seed, strategy, tracking, train"),
        ({"train": {"max_steps": "ten"}},
         "train.max_steps: input should be a valid integer, unable to parse string as an integer "
         "(got 'ten')"),
        ({"optim": {"lr": -1}}, "optim.lr: input should be greater than 0 (got -1)"),
        ({"resources": {"workers": 0}},
         "resources.workers: input should be greater than or equal to 1 (got 0)"),
        ({"model": {"kind": "gtp"}},
         "model.kind: 'gtp' is not a known kind (did you mean 'gpt'?); accepted: gpt, encoder, vit, resnet, lstm, gru"),
        ({"strategy": {"kind": "fsdpp"}},
         "strategy.kind: 'fsdpp' is not a known kind (did you mean 'fsdp'?); accepted: ddp, fsdp, deepspeed"),
        ({"train": {"precision": "fp16"}},
         "train.precision: input should be 'fp32' or 'bf16' (got 'fp16')"),
        ({"model": {"kind": "gpt", "d_model": 64, "n_head": 3}},
         "model: d_model=64 is not divisible by n_head=3; pick n_head dividing d_model"),
        ({"name": "has space"},
         "name: string should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]*$' (got 'has space')"),
        ({"objective": {"kind": "mae"}},
         "objective.kind 'mae' cannot train model.kind 'gpt'; accepted: causal_lm, classify"),
        ({"train": {"device": "cuda"}},
         "train.device is 'cuda' but resources.gpus_per_worker is 0; set "
         "resources.gpus_per_worker>=1 or train.device=cpu"),
    ],
)
def test_bad_spec_messages(tmp_path: Path, patch: dict, expected: str) -> None:
    path = write(tmp_path, {**BASE, **patch})
    assert problems(path) == [f"{path}: {expected}"]


def test_missing_required_keys(tmp_path: Path) -> None:
    path = write(tmp_path, {"seed": 1})
    assert problems(path) == [f"{path}: name: required key is missing",
                              f"{path}: model: required key is missing"]


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "optim": {"lr": 0}, "train": {"max_steps": 0}})
    lines = problems(path)
    assert len(lines) == 2 and all(line.startswith(f"{path}: ") for line in lines)
    assert all("\n" not in line for line in lines)


def test_override_errors_name_the_override() -> None:
    assert problems(QUICKSTART, ["data.num_sample=3"]) == [
        "--set: data.num_sample: unknown key (did you mean 'num_samples'?); accepted: "
        "eval_samples, kind, noise, num_samples, num_workers"]
    assert problems(QUICKSTART, ["optim.kind=adam"]) == [
        "--set: optim.kind: input should be 'adamw' or 'sgd' (got 'adam')"]
    assert problems(QUICKSTART, ["nokey"]) == [
        "--set 'nokey': expected KEY.PATH=VALUE, e.g. --set optim.lr=1e-3"]
    assert problems(QUICKSTART, ["optim.lr.x=1"]) == [
        "--set optim.lr.x: optim.lr is a value (0.003), not a section"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\nmodel:\n  kind: gpt\n kind: 3\n",
         ":4:2: invalid YAML: expected <block end>, but found '<block mapping start>'"),
        ("name: x\nname: y\n", ":2:1: invalid YAML: duplicate key 'name' (remove one of them)"),
        ("", ": the file is empty; a job spec needs at least name and model"),
        ("- a\n- b\n", ": a job spec must be a mapping of sections (name, model, ...), got a list"),
    ],
)
def test_bad_yaml_messages(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert problems(path) == [f"{path}{expected}"]


def test_missing_and_unreadable_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.yaml"
    assert problems(missing) == [f"{missing}: file not found; check the path to the job spec"]
    assert problems(tmp_path) == [f"{tmp_path}: is a directory; pass the job spec's .yaml file"]
    locked = write(tmp_path, BASE, "locked.yaml")
    real_read_text = Path.read_text

    def deny(self: Path, *args, **kwargs):  # root reads mode-000 files, so deny explicitly
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    assert problems(locked) == [f"{locked}: permission denied; make the file readable"]
