"""Clip by the global gradient norm over every shard, whatever holds the gradients.

Plain tensors (DDP) are full replicas; DTensor gradients (FSDP2, tensor parallel, both on
a 2-D mesh) hold shards: each shard's sum of squares is summed over the mesh dimensions it
is sharded on (never over replicated ones), so the norm is the full model's, on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_global(params: Iterable[torch.Tensor], max_norm: float | None, *,
                          stage_group: dist.ProcessGroup | None = None,
                          uncounted: Iterable[torch.Tensor] = ()) -> torch.Tensor:
    """Scale gradients so their global 2-norm is at most `max_norm` (None: only measure);
    return the pre-clip global norm (fp32, on the gradients' device). Same coefficient as
    `torch.nn.utils.clip_grad_norm_`: min(1, max_norm / (norm + 1e-6)). `stage_group`: the
    pipeline's stages, each holding other parameters (their squares are summed over it).
    `uncounted`: parameters among `params` that another stage holds too (a tied embedding's
    copy), clipped but left out of the norm (the other stage counts them)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    meshes: dict[tuple, tuple] = {}
    skip = {id(p) for p in uncounted}
    replicas = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if id(p) in skip:
            replicas.append(g.to_local() if isinstance(g, DTensor) else g)
            continue
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                g = g.redistribute(g.device_mesh, [pl if not pl.is_partial() else _replicate()
                                                   for pl in g.placements])
            dims = tuple(i for i, pl in enumerate(g.placements) if pl.is_shard())
            key = (id(g.device_mesh), dims)
            meshes[key] = (g.device_mesh, dims)
            groups.setdefault(key, []).append(g.to_local())
        else:
            groups.setdefault((None, ()), []).append(g)
    locals_ = [t for ts in groups.values() for t in ts]
    if not locals_ and stage_group is None:
        return torch.zeros(())
    device = locals_[0].device if locals_ else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for key, tensors in groups.items():
        sq = sum(torch.linalg.vector_norm(t, 2, dtype=torch.float32).square() for t in tensors)
        sq = sq.to(device)
        if key[0] is not None:
            mesh, dims = meshes[key]
            for d in dims:
                dist.all_reduce(sq, group=mesh.get_group(d))
        total_sq += sq
    if stage_group is not None:
        dist.all_reduce(total_sq, group=stage_group)
    total = total_sq.sqrt()
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for t in locals_ + replicas:
            t.mul_(coef.to(t.device, t.dtype))
    return total


def _replicate():
    from torch.distributed.tensor import Replicate

    return Replicate()
