"""Load a job spec from YAML, apply `--set a.b=c` overrides, and explain every mistake.

`load_spec(path, overrides)` returns a frozen, validated `JobSpec` or raises `SpecError`
with one line per problem: `<source>: <field.path>: <what is wrong> (got <value>)`, where
source is the file or `--set` for a value that came from an override.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from temper.errors import SpecError
from temper.spec.job import JobSpec


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (remove one of them)", key_node.start_mark
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from `path`, turning every I/O or syntax problem into SpecError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{p}: file not found; check the path to the job spec"]) from None
    except IsADirectoryError:
        raise SpecError([f"{p}: is a directory; pass the job spec's .yaml file"]) from None
    except PermissionError:
        raise SpecError([f"{p}: permission denied; make the file readable"]) from None
    except UnicodeDecodeError as e:
        raise SpecError([f"{p}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([f"{where}: invalid YAML: {problem}"]) from None
    if data is None:
        raise SpecError([f"{p}: the file is empty; a job spec needs at least name and model"])
    if not isinstance(data, dict):
        raise SpecError(
            [f"{p}: a job spec must be a mapping of sections (name, model, ...), "
             f"got a {type(data).__name__}"]
        )
    return data


# ------------------------------------------------------------------ schema navigation


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated and Optional[...] wrappers."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """Map each `kind` tag to its spec class, for the spec classes an annotation names.

    Pydantic puts the tag into error locations of discriminated sections
    (`model.gpt.n_layer`); `_walk` uses this map to recognise and drop it.
    """
    ann = _unwrap(annotation)
    args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    members = {}
    for arg in args:
        arg = _unwrap(arg)
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "kind" in arg.model_fields:
            members[arg.model_fields["kind"].default] = arg
    return members


def _walk(loc: tuple, data: Any = None) -> tuple[list[str], type[BaseModel] | None, Any]:
    """Follow an error location through the schema.

    Returns the display path (discriminator tags removed), the spec class that owns the
    last element, and the annotation of the last element (None when unknown).
    """
    path: list[str] = []
    owner: type[BaseModel] | None = None
    current: Any = JobSpec
    for item in loc:
        members = _union_members(current) if current is not None else {}
        if item in members and item not in members[item].model_fields:
            current = members[item]  # a discriminator tag pydantic added to the location
            continue
        if members and isinstance(data, dict) and data.get("kind") in members:
            current = members[data["kind"]]
        cls = _unwrap(current) if current is not None else None
        path.append(str(item))
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            owner = cls
            field = cls.model_fields.get(str(item))
            current = field.annotation if field else None
        else:
            owner, current = None, None
        data = data.get(item) if isinstance(data, dict) else None
    return path, owner, current


def _did_you_mean(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- messages


def _describe(err: dict, data: dict) -> tuple[str, str]:
    """Turn one pydantic error into (field path, message)."""
    path, owner, _ = _walk(tuple(err["loc"]), data)
    dotted = ".".join(path) or "(top level)"
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        key = path[-1]
        accepted = sorted(owner.model_fields) if owner else []
        hint = _did_you_mean(key, accepted)
        return dotted, f"unknown key{hint}; accepted: {', '.join(accepted)}"
    if kind == "missing":
        return dotted, "required key is missing"
    if kind == "union_tag_invalid":
        tags = [t.strip("'\" ") for t in str(ctx.get("expected_tags", "")).split(",")]
        hint = _did_you_mean(str(ctx.get("tag")), tags)
        return f"{dotted}.kind", f"{_short(ctx.get('tag'))} is not a known kind{hint}; accepted: {', '.join(tags)}"
    if kind == "union_tag_not_found":
        return f"{dotted}.kind", "required key is missing (it selects which kind of section this is)"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        return dotted, msg[len("Value error, "):]
    return dotted, f"{msg[0].lower()}{msg[1:]} (got {_short(err.get('input'))})"


def validate_spec(data: dict[str, Any], *, source: str, overridden: set[str] = frozenset()) -> JobSpec:
    """Validate a raw mapping into a JobSpec; raise SpecError with one line per problem."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            dotted, message = _describe(err, data)
            if dotted == "(top level)":  # a cross-field check: its message names the fields
                origin = "--set" if any(o in message for o in overridden) else source
                lines.append(f"{origin}: {message}")
                continue
            origin = "--set" if any(dotted == o or dotted.startswith(o + ".") for o in overridden) else source
            lines.append(f"{origin}: {dotted}: {message}")
        raise SpecError(lines) from None


# -------------------------------------------------------------------------- overrides


def _is_text(annotation: Any) -> bool:
    ann = _unwrap(annotation)
    if ann is str:
        return True
    if typing.get_origin(ann) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(ann))
    return False


#: What YAML reads as null (besides an empty value); `--set KEY=null` means the same for every key.
NULL_SPELLINGS = frozenset({"null", "Null", "NULL", "~"})


def _admits_none(annotation: Any) -> bool:
    """Whether a field annotated `annotation` accepts None (Optional[...], `X | None`, Any)."""
    if annotation is Any or annotation is type(None):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _admits_none(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_admits_none(a) for a in typing.get_args(annotation))
    return False


def _text_value(raw: str) -> str:
    """A string field's override: the raw text, unless it is one quoted YAML scalar
    (`"null"`, `'~'`), which gives the text inside the quotes."""
    stripped = raw.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        try:
            value = yaml.safe_load(stripped)
        except yaml.YAMLError:
            return raw
        if isinstance(value, str):
            return value
    return raw


def _expected(annotation: Any) -> str:
    """A few words for what a field accepts (for the `cannot be null` message)."""
    ann = _unwrap(annotation)
    if typing.get_origin(ann) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        kinds: list[str] = []
        for cls in _union_members(ann).values():  # every tag, e.g. both of `kind: lstm | gru`
            tags = typing.get_args(_unwrap(cls.model_fields["kind"].annotation))
            kinds += [t for t in tags if t not in kinds]
        return f"a section (kind: {', '.join(kinds)})" if kinds else "a value"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "a section"
    words = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             tuple: "a list", list: "a list", dict: "a mapping"}
    return words.get(typing.get_origin(ann) or ann, "a value")


def _null_problem(key: str, raw: str, owner: type[BaseModel] | None, annotation: Any) -> str | None:
    """Why `--set KEY=null` cannot apply to this field, or None when it can (or the key is
    unknown here: validation then reports it like any other value)."""
    field = owner.model_fields.get(key.rsplit(".", 1)[-1]) if owner else None
    if field is None or annotation is None or _admits_none(annotation):
        return None
    head = f"--set {key}={raw}: {key} cannot be null"
    if field.is_required():
        return f"{head} (it is required); give {_expected(annotation)}"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return f"{head} (it is not optional); give {_expected(annotation)}"
    shown = _short(default) if isinstance(default, str) else json.dumps(default)
    return f"{head} (it is not optional); give {_expected(annotation)} (default {shown})"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], set[str]]:
    """Apply `a.b.c=value` overrides to a copy of `data`.

    Values are typed by the schema: `null` (or `~`, `Null`, `NULL`) is null for every key,
    clearing an optional one and refused for one that cannot be null; otherwise a string
    field keeps the raw text (a quoted value, `"null"`, gives the text inside the quotes),
    and any other field takes the value parsed as YAML (`1e-3`, `[1, 2]`, `true`), which
    pydantic then checks like a value from the file.
    """
    result = json.loads(json.dumps(data))  # deep copy of plain YAML data
    touched: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise SpecError([f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set optim.lr=1e-3"])
        parts = key.split(".")
        _, owner, annotation = _walk(tuple(parts), result)
        value: Any
        if raw.strip() in NULL_SPELLINGS:
            value = None
        elif _is_text(annotation):
            value = _text_value(raw)
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw  # let the schema say what it expected
        if value is None and (problem := _null_problem(key, raw, owner, annotation)):
            raise SpecError([problem])
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if depth == 0 and part == "strategy" and isinstance(child, str):
                child = node[part] = {"preset": child}  # `strategy: fsdp` + strategy.x=...
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise SpecError([f"--set {key}: {prefix} is a value ({_short(child)}), not a section"])
            node = child
        node[parts[-1]] = value
        touched.add(key)
    return result, touched


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read, override and validate a job spec file."""
    data = read_yaml(path)
    data, touched = apply_overrides(data, list(overrides))
    return validate_spec(data, source=str(path), overridden=touched)


# ------------------------------------------------------------------------ serializing


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """The fully resolved spec as plain JSON-able data (defaults filled in)."""
    return spec.model_dump(mode="json")


def spec_to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False)


def spec_to_json(spec: JobSpec) -> str:
    return json.dumps(spec_to_dict(spec), sort_keys=True)


def spec_from_json(text: str) -> JobSpec:
    """Rebuild a spec on a worker from the driver's JSON (already validated there)."""
    return JobSpec.model_validate_json(text)


def spec_hash(spec: JobSpec) -> str:
    """A short stable hash of the resolved spec (identical specs, identical hash)."""
    return hashlib.sha256(spec_to_json(spec).encode()).hexdigest()[:12]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested spec data into dotted keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
    return out
