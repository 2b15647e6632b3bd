"""BERT-style bidirectional encoder: pre-LayerNorm blocks without a causal mask.

Pure single-device model, like temper.models.gpt (whose Block it reuses with causal=False):
strategies wrap each entry of `Encoder.blocks`. Heads (temper.models.base):

- `heads.mlm` (objective mlm): Linear d->d, GELU, LayerNorm, then a decoder to the
  vocabulary whose weight is the token embedding (tied) plus its own bias (BERT's).
- `heads.classify` (objective classify): Linear d->num_classes on the mean of the token
  states (pool: mean) or on a learned [CLS] token prepended to the input (pool: cls).

The [CLS] token is part of the backbone whenever pool is cls, so MLM pretraining and
classification fine-tuning share every backbone name and shape.
"""

from __future__ import annotations

import torch
from torch import nn

from temper.models.base import TaskModel, check_seq_len
from temper.models.gpt import Block, TransformerCounts, init_gpt2
from temper.spec.job import EncoderSpec


class MLMHead(nn.Module):
    """Transform (Linear, GELU, LayerNorm) then a vocabulary decoder; the decoder's weight is
    set to the token embedding by the encoder (tied), its bias is its own."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


class Encoder(TransformerCounts, TaskModel):
    """forward(tokens [B, T], head="mlm") -> logits [B, T, vocab_size];
    head="classify" -> [B, num_classes] from the mean (or [CLS]) final state."""

    #: The layer stack, as data (see GPT.pipeline_stack); cls_token rides with the embedding.
    pipeline_stack = {"embed": ("tok_emb", "pos_emb", "cls_token", "drop"), "blocks": "blocks",
                      "output": ("ln_f", "heads")}

    def __init__(self, spec: EncoderSpec, *, objective=None) -> None:
        super().__init__()
        self.spec = spec
        kind = getattr(objective, "kind", "mlm")
        self.objective_kind = kind
        self.use_cls = spec.pool == "cls"
        self.extra_tokens = int(self.use_cls)  # the blocks see the [CLS] token too
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos_emb = nn.Embedding(spec.seq_len + int(self.use_cls), spec.d_model)
        if self.use_cls:
            self.cls_token = nn.Parameter(torch.empty(1, 1, spec.d_model))
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec, causal=False) for _ in range(spec.n_layer))
        self.ln_f = nn.LayerNorm(spec.d_model)
        heads: dict[str, nn.Module] = {}
        if kind == "mlm":
            heads["mlm"] = MLMHead(spec.d_model, spec.vocab_size)
            heads["mlm"].decoder.weight = self.tok_emb.weight  # tied; materialize re-ties it
        elif kind == "classify":
            heads["classify"] = nn.Linear(spec.d_model, spec.num_classes)
        self.heads = nn.ModuleDict(heads)
        self.init_weights()

    def init_backbone_parameter(
        self, name: str, tensor: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> None:
        """The GPT-2 scheme (init_gpt2), the [CLS] token included."""
        init_gpt2(name, tensor, n_layer=self.spec.n_layer, generator=generator)

    def head_flops(self) -> int:
        """mlm: the MLM head (dense d x d, then the tied d x vocab decoder) on every input
        token (not on [CLS]); classify: the classifier once per sequence, on the pooled state."""
        head_params = sum(p.numel() for p in self.heads.parameters())  # mlm: the tied decoder too
        if self.objective_kind == "mlm":
            return 6 * head_params * self.spec.seq_len
        return 6 * head_params

    def forward(self, tokens: torch.Tensor, head: str = "mlm") -> torch.Tensor:
        return self.output(self.features(tokens), head=head)

    def output(self, x: torch.Tensor, *, head: str = "mlm") -> torch.Tensor:
        """The final norm, pooling (classify) and `head` on the last block's states."""
        x = self.ln_f(x)
        if head == "classify":
            pooled = x[:, 0] if self.use_cls else x.mean(dim=1)
            return self.heads["classify"](pooled)
        if self.use_cls:
            x = x[:, 1:]  # one prediction per input token
        return self.heads[head](x)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T (+1 with the [CLS] token first), d_model] before the final norm."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return x

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings (with the [CLS] token first when pool is cls): the first block's input."""
        check_seq_len(tokens, self.spec.seq_len)
        b = tokens.shape[0]
        x = self.tok_emb(tokens)
        if self.use_cls:
            x = torch.cat([self.cls_token.expand(b, 1, -1).to(x.dtype), x], dim=1)
        pos = torch.arange(x.shape[1], device=tokens.device)
        return self.drop(x + self.pos_emb(pos))
