"""Render the job spec reference (docs/job-spec.md's tables) from the pydantic models.

`temper schema --markdown` prints it; a test checks docs/job-spec.md holds exactly this
between its GENERATED markers, so the docs cannot drift from the code.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from temper.spec.job import JobSpec

BEGIN = "<!-- BEGIN GENERATED: temper schema --markdown -->"
END = "<!-- END GENERATED -->"


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [a.model_fields["kind"].default for a in args
                 if isinstance(a, type) and issubclass(a, BaseModel) and "kind" in a.model_fields]
        if kinds:
            rest = [_type_name(a) for a in args if not (isinstance(a, type) and issubclass(a, BaseModel))]
            return " \\| ".join([f"section (kind: {', '.join(kinds)})", *rest])
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if origin is dict:
        return f"map[{_type_name(args[0])}, {_type_name(args[1])}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{value!r}`".replace("None", "null").replace("True", "true").replace("False", "false")


def _constraints(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                parts.append(f"{sym} {getattr(meta, attr)}")
        if getattr(meta, "pattern", None):
            parts.append(f"matches `{meta.pattern}`")
    return ", ".join(parts)


def _table(cls: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | notes |", "| --- | --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        notes = " ".join(x for x in (field.description or "", _constraints(field)) if x)
        rows.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | {_default(field)} | {notes} |")
    return rows


def _sections(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """Every spec class reachable from `cls`, with the dotted prefix it lives under."""
    found = [(prefix.rstrip(".") or "(top level)", cls)]
    for name, field in cls.model_fields.items():
        ann = field.annotation
        args = typing.get_args(typing.get_args(ann)[0]) if typing.get_origin(ann) is typing.Annotated else ()
        candidates = [ann, *typing.get_args(ann), *args]
        for arg in candidates:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                found += _sections(arg, f"{prefix}{name}.")
    return found


def render_reference() -> str:
    """The Markdown reference of every section and key of the job spec."""
    out: list[str] = []
    seen: set[tuple[str, type]] = set()
    for where, cls in _sections(JobSpec):
        if (where, cls) in seen:
            continue
        seen.add((where, cls))
        kind = cls.model_fields.get("kind")
        title = f"`{where}`" + (f" with `kind: {kind.default}`" if kind is not None and where != "optim" else "")
        out += [f"### {title}", "", (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "), ""]
        out += _table(cls, f"{where}." if where != "(top level)" else "")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
