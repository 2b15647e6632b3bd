"""Model and objective specs: `model:` and `objective:` in a job, each a union on `kind:`.

A model is a backbone plus the heads its objective needs (see temper.models.base): the
same backbone weights move from a pretraining objective (causal_lm, mlm, mae, simclr) to a
supervised one (classify) with `init_from:`. No torch here: `temper validate` stays fast.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from temper.spec.base import BaseSpec


def _fill_flavor(data: Any, presets: dict[str, dict[str, Any]]) -> Any:
    """Fill fields the user left out from the named flavor's preset (explicit keys win)."""
    if not isinstance(data, dict) or data.get("flavor") is None:
        return data
    preset = presets.get(data["flavor"])
    if preset is None:
        return data  # the Literal on `flavor` reports the bad name
    return {**preset, **data}


def _heads_divide(d_model: int, n_head: int) -> None:
    if d_model % n_head:
        raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}; pick n_head dividing d_model")


# ----------------------------------------------------------------------------- models

GPT_FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 2, "n_head": 4, "d_model": 64, "seq_len": 64, "vocab_size": 256},
    "small": {"n_layer": 12, "n_head": 12, "d_model": 768, "seq_len": 1024, "vocab_size": 50304},
    "1b": {"n_layer": 24, "n_head": 16, "d_model": 2048, "seq_len": 2048, "vocab_size": 50304},
}


class GPTSpec(BaseSpec):
    """GPT-style decoder (pre-norm, causal self-attention, GELU MLP): causal LM, or sequence
    classification from the last token's hidden state."""

    kind: Literal["gpt"] = "gpt"
    flavor: Literal["tiny", "small", "1b"] | None = Field(
        default=None, description="Preset sizes; keys given explicitly override the preset."
    )
    vocab_size: int = Field(default=256, ge=2, description="Token vocabulary size.")
    seq_len: int = Field(default=64, ge=2, description="Context length in tokens.")
    n_layer: int = Field(default=2, ge=1, description="Number of transformer blocks.")
    n_head: int = Field(default=4, ge=1, description="Attention heads per block.")
    d_model: int = Field(default=64, ge=8, description="Residual stream width.")
    mlp_ratio: float = Field(default=4.0, gt=0, description="MLP hidden width / d_model.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = Field(default=True, description="Share input and output embeddings.")
    num_classes: int = Field(default=2, ge=2, description="Classes of the classify head (objective classify).")

    @model_validator(mode="before")
    @classmethod
    def _flavor(cls, data: Any) -> Any:
        return _fill_flavor(data, GPT_FLAVORS)

    @model_validator(mode="after")
    def _check(self) -> GPTSpec:
        _heads_divide(self.d_model, self.n_head)
        return self

    def tensor_parallel_dims(self) -> list[tuple[int, str, str]]:
        """The sizes the model's tensor_parallel_plan (models/gpt.py) splits, which a
        tensor-parallel degree must divide: (size, what it is, how the fix names it). A model
        spec without this method has no plan (tests/unit/test_layers.py keeps both in step)."""
        hidden = int(self.mlp_ratio * self.d_model)
        return [(self.n_head, f"model.n_head={self.n_head}", "model.n_head"),
                (hidden, f"the MLP width {hidden} (model.mlp_ratio x model.d_model)", "it")]


ENCODER_FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 2, "n_head": 4, "d_model": 64, "seq_len": 128, "vocab_size": 258},
    "base": {"n_layer": 12, "n_head": 12, "d_model": 768, "seq_len": 512, "vocab_size": 30522},
    "large": {"n_layer": 24, "n_head": 16, "d_model": 1024, "seq_len": 512, "vocab_size": 30522},
}


class EncoderSpec(BaseSpec):
    """BERT-style bidirectional encoder (pre-norm blocks, no causal mask): masked LM, or
    sequence classification from the mean (or a learned [CLS]) hidden state."""

    kind: Literal["encoder"] = "encoder"
    flavor: Literal["tiny", "base", "large"] | None = None
    vocab_size: int = Field(default=258, ge=3, description="Token vocabulary, including the mask token.")
    mask_token_id: int | None = Field(
        default=None, ge=0, description="The [MASK] token id (masked LM); null: vocab_size - 1."
    )
    seq_len: int = Field(default=128, ge=2, description="Context length in tokens.")
    n_layer: int = Field(default=2, ge=1)
    n_head: int = Field(default=4, ge=1)
    d_model: int = Field(default=64, ge=8)
    mlp_ratio: float = Field(default=4.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    pool: Literal["mean", "cls"] = Field(
        default="mean", description="Sequence summary for classify: mean of the tokens, or a learned [CLS] token."
    )
    num_classes: int = Field(default=2, ge=2, description="Classes of the classify head.")

    @model_validator(mode="before")
    @classmethod
    def _flavor(cls, data: Any) -> Any:
        return _fill_flavor(data, ENCODER_FLAVORS)

    @model_validator(mode="after")
    def _check(self) -> EncoderSpec:
        _heads_divide(self.d_model, self.n_head)
        if self.mask_token_id is not None and self.mask_token_id >= self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id} is not below vocab_size={self.vocab_size}; "
                             "pick an id inside the vocabulary (null: vocab_size - 1)")
        return self

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1 if self.mask_token_id is None else self.mask_token_id


VIT_FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 2, "n_head": 4, "d_model": 64},
    "small": {"n_layer": 12, "n_head": 6, "d_model": 384, "patch_size": 16, "image_size": 224},
    "base": {"n_layer": 12, "n_head": 12, "d_model": 768, "patch_size": 16, "image_size": 224},
}


class ViTSpec(BaseSpec):
    """Vision Transformer (pre-norm blocks over patch tokens): classify, MAE or SimCLR."""

    kind: Literal["vit"] = "vit"
    flavor: Literal["tiny", "small", "base"] | None = None
    image_size: int = Field(default=32, ge=4, description="Input height and width in pixels.")
    patch_size: int = Field(default=4, ge=1, description="Square patch side; divides image_size.")
    in_channels: int = Field(default=3, ge=1)
    n_layer: int = Field(default=2, ge=1)
    n_head: int = Field(default=4, ge=1)
    d_model: int = Field(default=64, ge=8)
    mlp_ratio: float = Field(default=4.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    pool: Literal["cls", "mean"] = Field(default="cls", description="Image summary: the [CLS] token or the patch mean.")
    num_classes: int = Field(default=10, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _flavor(cls, data: Any) -> Any:
        return _fill_flavor(data, VIT_FLAVORS)

    @model_validator(mode="after")
    def _check(self) -> ViTSpec:
        _heads_divide(self.d_model, self.n_head)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                             "pick a patch_size dividing image_size")
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


RESNET_FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": {"block": "basic", "layers": [1, 1, 1, 1], "base_width": 16},
    "resnet18": {"block": "basic", "layers": [2, 2, 2, 2], "base_width": 64},
    "resnet50": {"block": "bottleneck", "layers": [3, 4, 6, 3], "base_width": 64},
}


class ResNetSpec(BaseSpec):
    """ResNet (CNN): image classification, or SimCLR pretraining."""

    kind: Literal["resnet"] = "resnet"
    flavor: Literal["tiny", "resnet18", "resnet50"] | None = None
    num_classes: int = Field(default=10, ge=2)
    in_channels: int = Field(default=3, ge=1)
    image_size: int = Field(default=32, ge=8, description="Input height and width in pixels.")
    block: Literal["basic", "bottleneck"] = "basic"
    layers: tuple[int, int, int, int] = Field(default=(1, 1, 1, 1), description="Blocks per stage.")
    base_width: int = Field(default=16, ge=4, description="Channels of the first stage.")

    @model_validator(mode="before")
    @classmethod
    def _flavor(cls, data: Any) -> Any:
        return _fill_flavor(data, RESNET_FLAVORS)


class RecurrentSpec(BaseSpec):
    """LSTM or GRU over token embeddings: sequence classification from the last hidden state
    (both directions' when bidirectional)."""

    kind: Literal["lstm", "gru"] = "lstm"
    vocab_size: int = Field(default=258, ge=2)
    seq_len: int = Field(default=128, ge=2, description="Longest input in tokens.")
    d_model: int = Field(default=64, ge=4, description="Token embedding width.")
    hidden_size: int = Field(default=128, ge=4)
    n_layer: int = Field(default=1, ge=1)
    bidirectional: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Between stacked layers.")
    num_classes: int = Field(default=2, ge=2)


ModelSpec = Annotated[
    GPTSpec | EncoderSpec | ViTSpec | ResNetSpec | RecurrentSpec, Field(discriminator="kind")
]

#: The model kinds whose spec declares tensor_parallel_dims (their model has a TP plan).
TENSOR_PARALLEL_KINDS: tuple[str, ...] = tuple(
    kind for spec in (GPTSpec, EncoderSpec, ViTSpec, ResNetSpec, RecurrentSpec)
    if hasattr(spec, "tensor_parallel_dims")
    for kind in spec.model_fields["kind"].annotation.__args__
)

#: What a model reads from the batch: token ids or images.
MODEL_INPUTS: dict[str, str] = {
    "gpt": "tokens", "encoder": "tokens", "lstm": "tokens", "gru": "tokens",
    "resnet": "image", "vit": "image",
}

# ------------------------------------------------------------------------- objectives


class CausalLMSpec(BaseSpec):
    """Next-token prediction (cross-entropy over the vocabulary)."""

    kind: Literal["causal_lm"] = "causal_lm"


class ClassifySpec(BaseSpec):
    """Supervised classification of images or token sequences (cross-entropy; reports
    accuracy; evaluation logs a confusion matrix)."""

    kind: Literal["classify"] = "classify"
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)


class MLMSpec(BaseSpec):
    """Masked LM (BERT): mask_prob of the tokens are chosen; of those 80% become [MASK], 10% a
    random token, 10% stay; the loss is cross-entropy on the chosen positions only."""

    kind: Literal["mlm"] = "mlm"
    mask_prob: float = Field(default=0.15, gt=0.0, lt=1.0)


class MAESpec(BaseSpec):
    """Masked autoencoder (He et al. 2021): the encoder sees a random (1 - mask_ratio) of the
    patches; a small decoder predicts the pixels of the masked ones (MSE on those only).
    Evaluation logs a grid: original, masked input, reconstruction."""

    kind: Literal["mae"] = "mae"
    mask_ratio: float = Field(default=0.75, gt=0.0, lt=1.0)
    decoder_dim: int = Field(default=64, ge=8, description="Decoder width.")
    decoder_depth: int = Field(default=2, ge=1, description="Decoder transformer blocks.")
    decoder_heads: int = Field(default=4, ge=1)
    norm_pix_loss: bool = Field(default=True, description="Predict each patch's pixels normalized by its own mean/std.")
    grid_images: int = Field(default=8, ge=0, description="Images in the logged reconstruction grid (0: none).")


class SimCLRSpec(BaseSpec):
    """SimCLR (Chen et al. 2020): two augmented views per image (`view1`, `view2`, made by a
    data.transform such as temper.data.augment:simclr_views), a projection MLP, and the
    NT-Xent loss with the negatives gathered from every data-parallel rank."""

    kind: Literal["simclr"] = "simclr"
    temperature: float = Field(default=0.2, gt=0.0)
    proj_dim: int = Field(default=64, ge=2, description="Projection output width.")
    proj_hidden: int | None = Field(default=None, ge=2, description="Projection hidden width (null: the backbone's).")


ObjectiveSpec = Annotated[
    CausalLMSpec | ClassifySpec | MLMSpec | MAESpec | SimCLRSpec, Field(discriminator="kind")
]

#: Which objectives each model kind can train, the first being the default.
OBJECTIVES_FOR_MODEL: dict[str, tuple[str, ...]] = {
    "gpt": ("causal_lm", "classify"),
    "encoder": ("mlm", "classify"),
    "vit": ("classify", "mae", "simclr"),
    "resnet": ("classify", "simclr"),
    "lstm": ("classify",),
    "gru": ("classify",),
}


def objective_problems(*, model: Any, objective: Any) -> list[str]:
    """Pairings the field types cannot express, as one-line errors."""
    problems = []
    allowed = OBJECTIVES_FOR_MODEL[model.kind]
    if objective is not None and objective.kind not in allowed:
        return [f"objective.kind '{objective.kind}' cannot train model.kind '{model.kind}'; "
                f"accepted: {', '.join(allowed)}"]
    if objective is not None and objective.kind == "mae":
        visible = int(model.num_patches * (1 - objective.mask_ratio))
        if visible < 1:
            problems.append(f"objective.mask_ratio={objective.mask_ratio} leaves no visible patch of "
                            f"{model.num_patches}; lower it")
        if objective.decoder_dim % objective.decoder_heads:
            problems.append(f"objective.decoder_dim={objective.decoder_dim} is not divisible by "
                            f"decoder_heads={objective.decoder_heads}")
    return problems
