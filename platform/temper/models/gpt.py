"""GPT-style decoder (nanoGPT-like): pre-LayerNorm blocks, causal SDPA, GELU MLP.

Pure single-device model: no parallelism code. Strategies shard it from the outside:
FSDP wraps each entry of `GPT.blocks`; tensor parallelism follows `GPT.tensor_parallel_plan`
(Megatron-style: q/k/v and mlp.fc column-wise, attn.proj and mlp.proj row-wise, so each block
does one all-reduce in attention and one in the MLP, forward and backward). Attention infers
the local head count from the projection width, so column-sharded q/k/v work unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from temper.models.base import TaskModel, check_seq_len
from temper.spec.job import GPTSpec


@torch.no_grad()
def init_gpt2(name: str, tensor: torch.Tensor, *, n_layer: int, generator: torch.Generator | None = None) -> None:
    """GPT-2's scheme for a transformer backbone's parameter: biases 0, LayerNorm weights
    (modules named ln*) 1, N(0, 0.02) elsewhere, residual projections N(0, 0.02 / sqrt(2 n_layer))."""
    if name.endswith(".bias"):
        tensor.zero_()
    elif name.rpartition(".")[0].rpartition(".")[2].startswith("ln"):
        tensor.fill_(1.0)
    else:
        std = 0.02
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            std = 0.02 / math.sqrt(2 * n_layer)
        tensor.normal_(mean=0.0, std=std, generator=generator)


class TransformerCounts:
    """Parameter and FLOP counts shared by the GPT and the encoder (reads tok/pos embeddings,
    `heads`, `objective_kind` and spec.n_layer, d_model, seq_len).

    FLOP convention (the one torch.utils.flop_counter.FlopCounterMode counts, and MFU uses):
    2 FLOPs per multiply-add of every matmul, training = forward + backward = 3 x forward, so
    6 x (matmul weights) x (tokens they see); attention's two T x T matmuls per layer
    (QK^T and AV) counted in full even when causal (FlopCounterMode's SDPA formulas do not
    discount the mask), 12 x L x d x T^2 per sequence. Embedding lookups, norms, activations,
    softmax and bias additions are not counted; a tied LM head is a matmul and is counted.
    """

    spec: GPTSpec
    pos_emb: nn.Embedding
    tok_emb: nn.Embedding
    heads: nn.ModuleDict
    objective_kind: str
    #: Tokens the blocks see in addition to the seq_len inputs (the encoder's [CLS]).
    extra_tokens: int = 0

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); non_embedding drops the position embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def block_params(self) -> int:
        """Parameters every token's state passes through as matmul weights (blocks, final norm):
        everything but the embeddings, the [CLS] token, the LM head and `heads`."""
        skip = ("tok_emb.", "pos_emb.", "cls_token", "head.", "heads.")
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith(skip))

    def head_flops(self) -> int:
        """Training FLOPs of the output head for one sample (the model's own rule)."""
        raise NotImplementedError

    def train_flops_per_sample(self) -> int:
        """Training FLOPs (forward + backward) for one sequence of seq_len tokens: the blocks
        over every token (6 x block_params x T + 12 x L x d x T^2) plus the head the objective
        runs (head_flops)."""
        s = self.spec
        t = s.seq_len + self.extra_tokens
        return 6 * self.block_params() * t + 12 * s.n_layer * s.d_model * t * t + self.head_flops()

    def flops_per_token(self) -> int:
        """train_flops_per_sample spread over the sample's seq_len tokens (rounded). For a tied
        causal LM this is the PaLM / nanoGPT estimate_mfu figure, 6N + 12 * L * d * T."""
        return round(self.train_flops_per_sample() / self.spec.seq_len)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention via `scaled_dot_product_attention`: causal by default,
    bidirectional with causal=False (the encoder's). Reads d_model, n_head, dropout."""

    def __init__(self, spec: GPTSpec, *, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        d = spec.d_model
        self.head_dim = d // spec.n_head
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.dropout = spec.dropout
        self.resid_drop = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # [B, T, H, Dh] -> [B, H, T, Dh]; H is inferred so TP-sharded projections still work.
        q, k, v = (
            lin(x).view(b, t, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Linear -> GELU -> Linear with hidden width int(mlp_ratio * d_model)."""

    def __init__(self, spec: GPTSpec) -> None:
        super().__init__()
        hidden = int(spec.mlp_ratio * spec.d_model)
        self.fc = nn.Linear(spec.d_model, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, spec.d_model)
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); causal=False for
    the bidirectional encoder."""

    def __init__(self, spec: GPTSpec, *, causal: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.d_model)
        self.attn = CausalSelfAttention(spec, causal=causal)
        self.ln2 = nn.LayerNorm(spec.d_model)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(TransformerCounts, TaskModel):
    """Decoder-only transformer. forward(tokens [B, T], head="lm") -> logits [B, T, vocab_size];
    head="classify" (objective classify) -> [B, num_classes] from the last token's state.
    The LM head is part of the backbone (tied to the token embedding by default)."""

    tensor_parallel_plan = {
        "attn.q": "colwise", "attn.k": "colwise", "attn.v": "colwise", "attn.proj": "rowwise",
        "mlp.fc": "colwise", "mlp.proj": "rowwise",
    }

    #: The layer stack, as data (strategies/pipeline.py splits it): the first stage runs
    #: `embed` (these children), every stage its share of `blocks`, the last `output`.
    pipeline_stack = {"embed": ("tok_emb", "pos_emb", "drop"), "blocks": "blocks",
                      "output": ("ln_f", "head", "heads")}

    def __init__(self, spec: GPTSpec, *, objective=None) -> None:
        super().__init__()
        self.spec = spec
        kind = getattr(objective, "kind", "causal_lm")
        self.objective_kind = kind
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos_emb = nn.Embedding(spec.seq_len, spec.d_model)
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.ln_f = nn.LayerNorm(spec.d_model)
        self.head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        elif kind != "causal_lm":
            self.head = None  # an untied LM head would be an unused parameter
        self.heads = nn.ModuleDict(
            {"classify": nn.Linear(spec.d_model, spec.num_classes)} if kind == "classify" else {}
        )
        self.init_weights()

    def init_backbone_parameter(
        self, name: str, tensor: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> None:
        """The GPT-2 scheme (init_gpt2)."""
        init_gpt2(name, tensor, n_layer=self.spec.n_layer, generator=generator)

    def head_flops(self) -> int:
        """causal_lm: the LM head (a d_model x vocab matmul, tied or not) on every token;
        classify: the classifier on the last token only (the LM head does not run)."""
        if self.objective_kind == "causal_lm":
            return 6 * self.spec.d_model * self.spec.vocab_size * self.spec.seq_len
        return 6 * sum(p.numel() for p in self.heads.parameters())

    def forward(self, tokens: torch.Tensor, head: str = "lm") -> torch.Tensor:
        return self.output(self.features(tokens), head=head)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings [B, T, d_model]: the first block's input."""
        t = check_seq_len(tokens, self.spec.seq_len)
        pos = torch.arange(t, device=tokens.device)
        return self.drop(self.tok_emb(tokens) + self.pos_emb(pos))

    def output(self, x: torch.Tensor, *, head: str = "lm") -> torch.Tensor:
        """The final norm and `head` on the last block's states."""
        x = self.ln_f(x)
        if head == "lm":
            return self.head(x)
        return self.heads[head](x[:, -1])

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, d_model] after the last block (before the final norm)."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return x
