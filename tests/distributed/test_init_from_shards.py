"""init_from a DCP checkpoint under FSDP and FSDP x TP: each rank reads only its own shards
(models/init.py `_load_shards` -> DcpTensors.load_shards: one collective dcp.load into the
DTensor parameters), never a full tensor, and ends with exactly the saved values."""

from __future__ import annotations

import pytest
import torch

from temper.spec import load_spec, spec_to_json
from tests.distributed.spawn import run_ranks

pytestmark = pytest.mark.distributed

BASE = ["tracking.enabled=false", "resources.workers=2", "train.max_steps=2", "train.eval_every=0",
        "data.eval_samples=0", "model.n_layer=2", "model.d_model=64"]
STRATEGIES = {"fsdp": ["strategy=fsdp"], "fsdp_x_tp": ["strategy=fsdp", "strategy.tensor_parallel=2"]}


class _Counting:
    """The checkpoint's weights, counting full-tensor reads."""

    def __init__(self, weights) -> None:
        self.weights, self.shapes, self.full_reads = weights, weights.shapes, 0

    def get(self, name: str) -> torch.Tensor:
        self.full_reads += 1
        return self.weights.get(name)

    def load_shards(self, targets) -> bool:
        return self.weights.load_shards(targets)


def _init_from_each(folder: str, pretrain: str, targets: dict[str, str]) -> dict:
    from torch.distributed.tensor import distribute_tensor

    from temper.checkpoint import find_latest
    from temper.checkpoint.weights import open_weights
    from temper.dist import build_dist_context
    from temper.models import build_model
    from temper.models.init import clean_name
    from temper.run_info import RunInfo
    from temper.runtime.loop import train
    from temper.runtime.optim import build_optimizer
    from temper.spec import spec_from_json
    from temper.strategies import build_strategy

    ctx = build_dist_context(device="cpu")
    out = {}
    try:
        train(spec_from_json(pretrain), ctx, run_info=RunInfo(checkpoint_dir=folder))
        ctx.barrier()  # rank 0 commits the checkpoint
        source = open_weights(find_latest(folder).path)
        for name, text in targets.items():
            spec = spec_from_json(text)
            weights = _Counting(source)
            strategy = build_strategy(spec, ctx=ctx)
            with torch.device("meta"):
                model = build_model(spec.model, objective=spec.objective)
            strategy.setup(model, build_optimizer=lambda m, s=spec: build_optimizer(m, s.optim), pretrained=weights)
            reads, mismatched = weights.full_reads, []
            for pname, p in strategy.unwrap().named_parameters():
                full = source.get(clean_name(pname))
                local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                if not torch.equal(p.to_local(), local):
                    mismatched.append(pname)
            out[name] = {"full_reads": reads, "mismatched": mismatched,
                         "checked": len(list(strategy.unwrap().parameters()))}
            strategy.close()
    finally:
        ctx.close()
    return out


def test_init_from_reads_only_local_shards(tmp_path) -> None:
    pretrain = spec_to_json(load_spec("jobs/ci/tiny-gpt.yaml", [*BASE, "strategy=fsdp"]))
    targets = {name: spec_to_json(load_spec("jobs/ci/tiny-gpt.yaml", [*BASE, "seed=7", *extra]))
               for name, extra in STRATEGIES.items()}
    for rank in run_ranks(_init_from_each, 2, str(tmp_path / "run"), pretrain, targets):
        for name in STRATEGIES:
            assert rank[name]["checked"] > 0
            assert rank[name]["full_reads"] == 0, name  # no rank read a whole tensor
            assert rank[name]["mismatched"] == [], name  # seed 7 init fully replaced by the checkpoint
