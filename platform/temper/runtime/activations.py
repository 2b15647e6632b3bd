"""Activation memory of one micro-batch, per rank, by formula (`temper plan`; docs/plan.md).

What autograd keeps between forward and backward, counted tensor by tensor for our transformer block
(models/gpt.py: pre-norm, SDPA attention, GELU MLP of hidden width r x d), per token and
layer, in units of d elements; t = strategy.tensor_parallel (Megatron split without sequence
parallel: norm and residual tensors are replicated, everything between a column- and a
row-parallel Linear is split):

    replicated  ln1's input, the Linear inputs after ln1 and after ln2, ln2's input   4 units
    split / t   q, k, v, the attention output (the input of attn.proj: SDPA returns it in
                [B, T, H, Dh] layout, so the reshape is a view), fc's output and GELU's
                output (r units each)                                          4 + 2r units
    small       the norms' mean and rstd (4 floats), SDPA's logsumexp (1 float per head / t)

fp32: 4 bytes a unit, so 16 + 48 / t bytes x d at r = 4 (Korthikanti et al. 2022 count 17
tensors of 2 bytes; SDPA makes the copy before attn.proj unnecessary). bf16 autocast: the
residual stream and the norms' inputs stay fp32, every Linear keeps its own bf16 copy of its
input (so the three of q, k, v each one): 16 bytes replicated, 2 x (4 + 2r) split; and where
the parameters are fp32 in compute (DDP; FSDP with param_dtype fp32), autocast keeps a bf16
copy of every matmul weight the saved graph uses.

Activation checkpointing: `full` keeps each block's input (fp32) and, in backward, holds one
block's no-checkpoint amount while it recomputes; `selective` keeps the block input and the
outputs of every matmul and attention (attn.proj and mlp.proj replicated; q, k, v, SDPA and
fc split) and recomputes norms, GELU and casts (so no weight copies inside blocks).
Outside the blocks: token ids (8 bytes), the final norm's input (fp32) and the LM head's input
(fp32, bf16 under autocast) per token, and for causal_lm the log-softmax of the logits
(fp32, vocab per token). The encoder (models/encoder.py) runs the same blocks over its
tokens (+ [CLS]); its MLM head is counted in `_encoder_outside`. ViT, ResNet and the LSTM have
no formula yet: the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from temper.spec.job import JobSpec


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes one rank holds for one micro-batch: `saved` at the end of forward (what backward
    reads), `recompute` the extra held while activation checkpointing recomputes a block."""

    saved: int
    recompute: int

    @property
    def peak(self) -> int:
        return self.saved + self.recompute


def _fp32_weights_in_compute(spec: JobSpec) -> bool:
    """bf16 autocast over fp32 parameters (it then keeps bf16 copies of the weights)."""
    s = spec.strategy
    if spec.train.precision != "bf16" or s.kind == "deepspeed":  # DeepSpeed bf16: bf16 params
        return False
    return s.kind == "ddp" or s.param_dtype == "fp32"


def _gpt_outside(spec: JobSpec, *, tokens: int, unit: int) -> float:
    """Ids, the final norm's input and stats, the LM head's input; causal_lm: the fp32
    log-softmax over the vocabulary (and the head's bf16 weight copy over fp32 weights)."""
    m = spec.model
    out = tokens * (8 + 4 * m.d_model + unit * m.d_model + 8)
    if spec.objective is None or spec.objective.kind == "causal_lm":
        out += tokens * 4 * m.vocab_size
        if _fp32_weights_in_compute(spec):
            out += 2 * m.d_model * m.vocab_size
    return out


def _encoder_outside(spec: JobSpec, *, tokens: int, unit: int) -> float:
    """Ids, the final norm's input and stats; mlm: the MLM head on every input token (dense,
    GELU, LayerNorm, decoder inputs: norms in fp32) and the fp32 log-softmax on the
    mask_prob share of them the loss scores."""
    m, d = spec.model, spec.model.d_model
    n = tokens // (m.seq_len + int(m.pool == "cls")) * m.seq_len  # input tokens ([CLS] is dropped before the head)
    out = tokens * (4 * d + 8) + n * 8
    if spec.objective is not None and spec.objective.kind == "mlm":
        out += n * (d * (3 * unit + 4) + 8) + spec.objective.mask_prob * n * (4 * m.vocab_size + 8)
        if _fp32_weights_in_compute(spec):
            out += 2 * (d * d + d * m.vocab_size)
    return out


#: model.kind -> what its forward keeps outside the transformer blocks (`tokens` the blocks see).
_OUTSIDE = {"gpt": _gpt_outside, "encoder": _encoder_outside}


def estimate_activations(spec: JobSpec) -> ActivationEstimate | None:
    """The transformer's activations for `train.micro_batch_size` sequences, or None (no formula)."""
    parts = _parts(spec, samples=spec.train.micro_batch_size)
    if parts is None:
        return None
    saved_block, recompute, outside = parts
    return ActivationEstimate(saved=int(spec.model.n_layer * saved_block + outside), recompute=int(recompute))


def pipeline_activations(spec: JobSpec, *, pipeline_rank: int) -> ActivationEstimate | None:
    """One pipeline rank's activations (strategy.pipeline_parallel > 1): a pipeline
    micro-batch (micro_batch_size x grad_accum / pipeline_microbatches samples) through this
    rank's blocks, times the micro-batches the schedule holds in flight there (m micro-batches,
    p ranks, v stages per rank, rank r): gpipe m; 1f1b min(m, p - r); interleaved_1f1b
    min(m v, (v - 1) p + 2 (p - 1 - r) + 1) stage-micro-batches of 1/v of the rank's blocks
    (its warm-up forwards plus one, as torch's schedule runs them). The last rank adds the
    output part (final norm, head, log-softmax) for its in-flight micro-batches (gpipe m,
    else 1)."""
    from temper.strategies.pipeline_split import split_layers

    s = spec.strategy
    p, v, m = s.pipeline_parallel, s.stages_per_rank, s.pipeline_microbatches
    parts = _parts(spec, samples=spec.train.micro_batch_size * spec.train.grad_accum // m)
    if parts is None:
        return None
    saved_block, recompute, outside = parts
    counts = split_layers(n_layer=spec.model.n_layer, stages=p * v, explicit=s.pipeline_layers)
    blocks = sum(counts[pipeline_rank + k * p] for k in range(v))
    if s.pipeline_schedule == "gpipe":
        flight = float(m)
    elif s.pipeline_schedule == "1f1b":
        flight = float(min(m, p - pipeline_rank))
    else:
        flight = min(m * v, (v - 1) * p + 2 * (p - 1 - pipeline_rank) + 1) / v
    last = outside * (m if s.pipeline_schedule == "gpipe" else 1) if pipeline_rank == p - 1 else 0
    return ActivationEstimate(saved=int(flight * blocks * saved_block + last), recompute=int(recompute))


def _parts(spec: JobSpec, *, samples: int) -> tuple[float, float, float] | None:
    """(saved per block, held while recomputing one block, outside the blocks) in bytes for
    `samples` sequences, or None (no formula for this model)."""
    outside_fn = _OUTSIDE.get(spec.model.kind)
    if outside_fn is None:
        return None
    m, s = spec.model, spec.strategy
    tp = getattr(s, "tensor_parallel", 1)
    mode = getattr(s, "activation_checkpointing", "none")
    unit = 2 if spec.train.precision == "bf16" else 4  # bytes of a matmul output
    r = int(m.mlp_ratio * m.d_model) / m.d_model
    extra = int(getattr(m, "pool", None) == "cls")  # the encoder's [CLS] token
    tokens, d = samples * (m.seq_len + extra), m.d_model
    small = 16 + 4 * m.n_head / tp
    block = tokens * (d * (16 + (4 + 2 * r) * unit / tp) + small)
    block_weights = 2 * (4 + 2 * r) * d * d / tp if _fp32_weights_in_compute(spec) else 0
    if mode == "full":
        saved_block, recompute = tokens * d * 4, block + block_weights
    elif mode == "selective":
        saved_block = tokens * (d * (4 + 2 * unit + (4 + r) * unit / tp) + 4 * m.n_head / tp)
        recompute = block - saved_block + block_weights
    else:
        saved_block, recompute = block + block_weights, 0
    return saved_block, recompute, outside_fn(spec, tokens=tokens, unit=unit)
