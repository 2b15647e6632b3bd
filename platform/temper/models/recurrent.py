"""LSTM / GRU sequence classifier: token embedding -> nn.LSTM or nn.GRU -> `heads.classify`.

Pure single-device model. The whole (possibly stacked, bidirectional) RNN is one module, so
`Recurrent.blocks` is a ModuleList holding that one RNN: it is the unit strategies wrap for
activation checkpointing, compile and FSDP (an RNN's layers run inside one cuDNN/ATen call
and cannot be split further). The classifier reads the last time step's hidden state: with
bidirectional, the forward direction's last step and the backward direction's first step
(each direction's summary of the whole sequence), concatenated.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from temper.errors import TemperError
from temper.models.base import TaskModel, check_seq_len
from temper.spec.job import RecurrentSpec

RNNS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


class Recurrent(TaskModel):
    """forward(tokens [B, T], head="classify") -> logits [B, num_classes]."""

    def __init__(self, spec: RecurrentSpec, *, objective=None) -> None:
        super().__init__()
        self.spec = spec
        kind = getattr(objective, "kind", "classify")
        if kind != "classify":  # validation rejects this first; a guard for direct callers
            raise TemperError(f"objective.kind '{kind}' cannot train model.kind '{spec.kind}'; accepted: classify")
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
        rnn = RNNS[spec.kind](
            spec.d_model, spec.hidden_size, num_layers=spec.n_layer, batch_first=True,
            bidirectional=spec.bidirectional, dropout=spec.dropout if spec.n_layer > 1 else 0.0,
        )
        self.blocks = nn.ModuleList([rnn])
        directions = 2 if spec.bidirectional else 1
        self.heads = nn.ModuleDict({"classify": nn.Linear(directions * spec.hidden_size, spec.num_classes)})
        self.init_weights()

    @property
    def rnn(self) -> nn.RNNBase:
        return self.blocks[0]

    def init_backbone_parameter(
        self, name: str, tensor: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> None:
        """PyTorch's defaults, made deterministic per name: embedding N(0, 1), every RNN weight
        and bias U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))."""
        if name.startswith("tok_emb."):
            tensor.normal_(0.0, 1.0, generator=generator)
        else:
            bound = 1.0 / math.sqrt(self.spec.hidden_size)
            tensor.uniform_(-bound, bound, generator=generator)

    def forward(self, tokens: torch.Tensor, head: str = "classify") -> torch.Tensor:
        return self.heads[head](self.features(tokens))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The sequence summary [B, hidden_size * directions] the classifier reads."""
        check_seq_len(tokens, self.spec.seq_len)
        out, _ = self.rnn(self.tok_emb(tokens))  # [B, T, directions * H]
        h = self.spec.hidden_size
        if not self.spec.bidirectional:
            return out[:, -1]
        return torch.cat([out[:, -1, :h], out[:, 0, h:]], dim=-1)

    def train_flops_per_sample(self) -> int:
        """Training FLOPs for one sequence, in FlopCounterMode's convention (2 per multiply-add,
        backward = 2 x forward): 6 x (RNN parameters) x seq_len (every gate weight is one
        multiply-add per token and direction) plus 6 x (classifier parameters), applied once
        per sequence. The embedding lookup is not counted."""
        rnn = sum(p.numel() for p in self.rnn.parameters())
        head = sum(p.numel() for p in self.heads.parameters())
        return 6 * rnn * self.spec.seq_len + 6 * head
