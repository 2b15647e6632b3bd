"""Activation memory of one micro-batch, per rank, by formula (`temper plan`; docs/plan.md).

What autograd keeps between forward and backward, counted tensor by tensor for our GPT block
(models/gpt.py; pre-norm, SDPA attention, GELU MLP with hidden 4d), per token per layer in
units of d_model elements, with t = strategy.tensor_parallel (Megatron split, no sequence
parallel: the norms' and residual tensors are replicated, everything between a column- and
a row-parallel Linear is split):

    replicated: ln1 input, the Linear inputs after ln1 and ln2, ln2 input  (fp32: 4 x 4 bytes)
    split /t:   q, k, v, the attention output (proj input: SDPA returns it in [B, T, H, Dh]
                layout, so the reshape is a view), fc output (4), GELU output (4)
                                                                            (fp32: 12 x 4 bytes)
    plus the norms' mean/rstd (4 x 4 bytes) and SDPA's logsumexp (4 bytes per head)

so 64 bytes x d per token per layer in fp32 at t=1 (Korthikanti et al. 2022 count 34 bytes
in 16-bit: 17 tensors, with a copy before the output projection SDPA does not need). bf16 autocast: the residual stream and norm
inputs stay fp32, each Linear keeps its own bf16 copy of its input: 16 bytes replicated
and 24 / t split. Activation checkpointing: `full` keeps only each block's input (4 bytes x d
fp32) and recomputes one block at a time in backward (that block's no-checkpoint amount, held
once); `selective` keeps the block input and every matmul and attention output (3 replicated
+ 8 / t units; bf16: those are bf16 but the input) and recomputes the rest. Outside the blocks: token ids (8 bytes), the final
norm's input and output and, for causal_lm, the log-softmax of the logits (4 bytes x vocab)
per token. Models other than the GPT have no formula yet: the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from temper.spec.job import JobSpec

# (replicated, split) bytes per token per layer per d_model, by precision.
_BLOCK_BYTES = {"fp32": (16, 48), "bf16": (16, 24)}
# Selective: (block input, attn.proj and mlp.proj outputs | q, k, v, SDPA output, fc output).
_SELECTIVE = {"fp32": (3 * 4, 8 * 4), "bf16": (4 + 2 * 2, 8 * 2)}


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes one rank holds for one micro-batch: `saved` at the end of forward (what backward
    reads), `recompute` the extra held while activation checkpointing recomputes a block."""

    saved: int
    recompute: int

    @property
    def peak(self) -> int:
        return self.saved + self.recompute


def estimate_activations(spec: JobSpec) -> ActivationEstimate | None:
    """The GPT's activations for `train.micro_batch_size` sequences, or None (no formula)."""
    if spec.model.kind != "gpt":
        return None
    m = spec.model
    tp = getattr(spec.strategy, "tensor_parallel", 1)
    mode = getattr(spec.strategy, "activation_checkpointing", "none")
    tokens = spec.train.micro_batch_size * m.seq_len
    d = m.d_model
    replicated, split = _BLOCK_BYTES[spec.train.precision]
    block = tokens * (d * (replicated + split / tp) + 16 + 4 * m.n_head / tp)
    if mode == "full":
        saved_block, recompute = tokens * d * 4, block
    elif mode == "selective":
        kept, kept_split = _SELECTIVE[spec.train.precision]
        saved_block = tokens * (d * (kept + kept_split / tp) + 4 * m.n_head / tp)
        recompute = block - saved_block
    else:
        saved_block, recompute = block, 0
    outside = tokens * (8 + 8 * d + 8)  # ids; final norm in and out; its mean/rstd
    if spec.objective is None or spec.objective.kind == "causal_lm":
        outside += tokens * 4 * m.vocab_size
    return ActivationEstimate(saved=int(m.n_layer * saved_block + outside), recompute=int(recompute))
