"""Elastic ranges: the global batch is kept at every size by grad_accum, or the spec is refused
naming the sizes that cannot keep it."""

from __future__ import annotations

from pathlib import Path

import pytest

from temper.errors import SpecError
from temper.spec import load_spec
from temper.spec.elastic import elastic_sizes, grad_accum_at

TINY = Path(__file__).resolve().parents[2] / "jobs" / "ci" / "tiny-gpt.yaml"


def spec(*overrides: str):
    return load_spec(TINY, list(overrides))


def refused(*overrides: str) -> str:
    with pytest.raises(SpecError) as info:
        spec(*overrides)
    return "; ".join(info.value.problems)


def test_not_elastic_by_default() -> None:
    s = spec()
    assert s.resources.min_workers is None and list(elastic_sizes(s)) == [2]
    assert s.fault.preemption_grace_s == 30.0


def test_an_impossible_range_names_the_sizes() -> None:
    message = refused("resources.workers=4", "resources.min_workers=1")
    assert "cannot be kept at 3 workers" in message
    assert "global batch 32" in message and "min_workers=4" in message


def test_a_range_that_divides_is_accepted() -> None:
    s = spec("resources.workers=4", "resources.min_workers=2", "train.grad_accum=3")
    assert s.global_batch_size == 96
    assert [grad_accum_at(s, workers=n) for n in elastic_sizes(s)] == [6, 4, 3]


def test_two_to_one_doubles_the_accumulation() -> None:
    s = spec("resources.min_workers=1")
    assert [grad_accum_at(s, workers=n) for n in elastic_sizes(s)] == [2, 1]


def test_min_above_workers_is_refused() -> None:
    assert "resources.min_workers=3 is above resources.workers=2" in refused("resources.min_workers=3")


def test_elastic_needs_checkpoints() -> None:
    assert "set checkpoint.enabled=true" in refused("resources.min_workers=1", "checkpoint.enabled=false")


def test_tensor_parallel_sizes_must_be_multiples() -> None:
    message = refused("resources.workers=4", "resources.min_workers=2", "strategy.tensor_parallel=2")
    assert "cannot be kept at 3 workers" in message and "multiple of strategy.tensor_parallel=2" in message


def test_ray_gets_the_elastic_range_and_retries_every_loss() -> None:
    from ray.train import ScalingConfig

    from temper.launch.ray_launcher import failure_retries, scaling_kwargs

    elastic = spec("resources.min_workers=1", "resources.resize_interval_s=5")
    kwargs = scaling_kwargs(elastic)
    assert kwargs == {"num_workers": (1, 2), "elastic_resize_monitor_interval_s": 5.0}
    config = ScalingConfig(**kwargs)  # Ray 2.60's Train V2 API accepts it as elastic
    assert config.elasticity_enabled and (config.min_workers, config.max_workers) == (1, 2)
    assert failure_retries(elastic) == -1
    assert failure_retries(spec("resources.min_workers=1", "fault.max_failures=3")) == 3
    assert scaling_kwargs(spec()) == {"num_workers": 2} and failure_retries(spec()) == 0
