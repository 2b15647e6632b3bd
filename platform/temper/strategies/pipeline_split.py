"""How a model's layer stack is cut into pipeline stages, and what one rank keeps.

A model declares its layer stack as data (`pipeline_stack`: the children the first stage
runs in `embed`, the block list, the children the last stage runs in `output`). This module
holds no model code: like torchtitan's `pipeline_module_split`, it keeps on each rank only
the layers its stages own, under their ORIGINAL names (the block list becomes an
`nn.ModuleDict` keyed by the block's index, other layers are set to None), so a checkpoint's
keys never depend on the split.

    counts = split_layers(n_layer=8, stages=4)          # [1, 2, 3, 2]: embed and head weigh 1
    kept = apply_stage_pruning(model, owned=[blocks of this rank's stages], first=.., last=..)
    chunk = StageChunk(kept, blocks=[...], first=True, last=False)   # one stage's forward

Tied input/output embeddings (GPT's `tie_embeddings`, the encoder's MLM decoder) are kept
the Megatron way: the last stage keeps its own copy of the embedding layers the head shares
a weight with (`tied_layers`), under the same names, initialized alike from (seed, name);
the pipeline strategy sums the two copies' gradients over the first and last stages, so
they stay equal (one checkpoint entry: DCP writes a replicated key once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def split_layers(*, n_layer: int, stages: int, explicit: Sequence[int] | None = None) -> list[int]:
    """Blocks per stage: `explicit` when given, else balanced by layer count with the
    embedding (first stage) and the output head (last stage) weighed as one layer each;
    every stage gets at least one block."""
    if explicit is not None:
        return list(explicit)
    units = n_layer + 2
    base, extra = divmod(units, stages)
    # The remainder goes to the middle stages first: they carry neither embedding nor head.
    order = list(range(1, stages - 1)) + [0, stages - 1] if stages > 2 else list(range(stages))
    share = [base] * stages
    for i in order[:extra]:
        share[i] += 1
    counts = [share[i] - (i == 0) - (i == stages - 1) for i in range(stages)]
    while min(counts) < 1:  # tiny models: move a block from the largest stage
        counts[counts.index(max(counts))] -= 1
        counts[counts.index(min(counts))] += 1
    return counts


def stage_ranges(counts: Sequence[int]) -> list[range]:
    """Block index ranges of each stage, in stage order."""
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def tied_layers(model: nn.Module) -> tuple[str, ...]:
    """The embedding layers (children named in `embed`) holding a parameter that an output
    layer uses too: the tied token embedding, or () when nothing is tied."""
    stack = model.pipeline_stack
    used = {id(p) for n in stack["output"] if isinstance(getattr(model, n, None), nn.Module)
            for p in getattr(model, n).parameters()}
    return tuple(n for n in stack["embed"] if isinstance(getattr(model, n, None), nn.Module)
                 and any(id(p) in used for p in getattr(model, n).parameters()))


def apply_stage_pruning(model: nn.Module, *, blocks: Sequence[int], first: bool, last: bool) -> None:
    """Keep only `blocks` (indices into the stack) and, on the first stage, the embedding,
    on the last the output layers and the embedding layers they are tied to; in place,
    names unchanged."""
    stack = model.pipeline_stack
    tied = tied_layers(model) if last else ()
    layers = getattr(model, stack["blocks"])
    kept = nn.ModuleDict({str(i): layers[i] for i in blocks})
    setattr(model, stack["blocks"], kept)
    for names, keep in ((stack["embed"], first), (stack["output"], last)):
        if keep:
            continue
        for name in (n for n in names if n not in tied):
            if hasattr(model, name):
                value = getattr(model, name)
                if isinstance(value, nn.ModuleDict):
                    setattr(model, name, nn.ModuleDict())
                elif isinstance(value, nn.Parameter):
                    delattr(model, name)
                else:
                    setattr(model, name, None)


class StageChunk(nn.Module):
    """One pipeline stage's forward over layers of the rank's pruned model: `embed` on the
    first stage, its blocks, `output(x, head=...)` on the last. It registers the layers it
    runs (so FSDP and DDP over a chunk see exactly its parameters) and calls the model's own
    `embed` / `output` (the model object is held, not registered: names stay the model's)."""

    def __init__(self, model: nn.Module, *, blocks: Sequence[int], first: bool, last: bool) -> None:
        super().__init__()
        stack = model.pipeline_stack
        self._model = [model]  # a list: not a registered submodule
        self.first, self.last = first, last
        self.head: str | None = None  # set per step from the objective's call
        layers = getattr(model, stack["blocks"])
        self.blocks = nn.ModuleDict({str(i): layers[str(i)] for i in blocks})
        names = (stack["embed"] if first else tied_layers(model) if last else ()) + (stack["output"] if last else ())
        self.parts = nn.ModuleDict({n: getattr(model, n) for n in names
                                    if isinstance(getattr(model, n, None), nn.Module)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        if self.first:
            x = model.embed(x)
        for block in self.blocks.values():
            x = block(x)
        if self.last:
            x = model.output(x, **({"head": self.head} if self.head else {}))
        return x


def stack_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks whether whole (nn.ModuleList) or pruned for a pipeline (nn.ModuleDict)."""
    blocks = getattr(model, "blocks", [])
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)
