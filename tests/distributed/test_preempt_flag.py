"""The per-step preemption flag on accelerators goes over a CPU (gloo) group of the same
ranks, so it never synchronizes the device: here on 2 gloo ranks with a context that says its
device is not the CPU (meta), every rank gets the same decision at the same step."""

from __future__ import annotations

from tests.distributed.spawn import run_ranks


def _agree() -> list:
    import dataclasses

    import torch

    from temper.dist import build_dist_context
    from temper.runtime.preempt import Preemption

    ctx = build_dist_context(device="cpu")
    try:
        accel = dataclasses.replace(ctx, device=torch.device("meta"))  # no meta tensor may reach gloo
        flag = Preemption.build(grace_s=30, ctx=accel, reporter=None)
        quiet = flag.agreed(last_save_s=0.0)
        if ctx.rank == 1:
            flag.notice("SIGTERM")
        decision = flag.agreed(last_save_s=0.25 * (ctx.rank + 1))
        return [flag._group is not None, quiet, decision.save_estimate_s, decision.can_save]
    finally:
        ctx.close()


def test_the_flag_of_gpu_ranks_goes_over_a_cpu_group() -> None:
    ranks = run_ranks(_agree, 2)
    assert ranks[0] == ranks[1] == [True, None, 0.5, True], ranks
