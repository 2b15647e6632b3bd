"""The base of every spec model: frozen, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class BaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
