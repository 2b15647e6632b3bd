"""Objectives: loss values against a hand computation, metrics, counts, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from temper.errors import TemperError
from temper.objectives import (
    OBJECTIVE_BUILDERS,
    CausalLM,
    Classify,
    ObjectiveOutput,
    build_objective,
)
from temper.spec import CausalLMSpec, ClassifySpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _RecordingLM(nn.Module):
    """Logits are a fixed table indexed by the input token, in bf16; records its input."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.randn(vocab, vocab)
        self.seen: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.seen = tokens
        return self.table[tokens].to(torch.bfloat16)


def test_causal_lm_shifts_targets_and_uses_float32_loss() -> None:
    torch.manual_seed(0)
    model = _RecordingLM(vocab=7)
    tokens = torch.randint(0, 7, (3, 9))
    out = CausalLM()(model, {"tokens": tokens})
    assert isinstance(out, ObjectiveOutput)
    assert torch.equal(model.seen, tokens[:, :-1])
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    logits = model.table[tokens[:, :-1]].to(torch.bfloat16).float()
    manual = -torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).mean()
    assert torch.allclose(out.loss, manual)
    assert out.metrics == {} and out.num_samples == 3 and out.num_tokens == 3 * 8


def test_causal_lm_uniform_logits_give_log_vocab() -> None:
    class Zeros(nn.Module):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*tokens.shape, 11)

    out = CausalLM()(Zeros(), {"tokens": torch.randint(0, 11, (2, 5))})
    assert out.loss.item() == pytest.approx(math.log(11))


class _FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor, head: str = "classify") -> torch.Tensor:
        assert images.shape[0] == self.logits.shape[0] and head == "classify"
        return self.logits


def test_classify_loss_accuracy_and_counts() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    batch = {"image": torch.zeros(4, 1, 2, 2), "label": labels}
    out = Classify()(_FixedLogits(logits), batch)
    assert torch.allclose(out.loss, F.cross_entropy(logits, labels))
    assert out.metrics["acc"].item() == pytest.approx(0.5)
    assert out.num_samples == 4 and out.num_tokens == 0


def test_classify_label_smoothing_raises_confident_loss() -> None:
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    batch = {"image": torch.zeros(2, 1, 2, 2), "label": torch.tensor([0, 1])}
    plain = Classify()(_FixedLogits(logits), batch).loss
    smooth = Classify(label_smoothing=0.2)(_FixedLogits(logits), batch).loss
    assert torch.allclose(smooth, F.cross_entropy(logits, batch["label"], label_smoothing=0.2))
    assert smooth > plain


def test_build_objective_from_spec() -> None:
    assert set(OBJECTIVE_BUILDERS) >= {"causal_lm", "classify"}
    assert isinstance(build_objective(CausalLMSpec()), CausalLM)
    obj = build_objective(ClassifySpec(label_smoothing=0.1))
    assert isinstance(obj, Classify) and obj.label_smoothing == 0.1


def test_build_objective_rejects_missing_and_unknown() -> None:
    with pytest.raises(TemperError, match="objective"):
        build_objective(None)

    class Fake:
        kind = "nope"

    with pytest.raises(TemperError, match="objective.kind 'nope'"):
        build_objective(Fake())
