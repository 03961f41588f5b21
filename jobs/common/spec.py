"""What every spec model shares: the base model, the field types whose rules hold in both specs,
and loading a spec document with every problem reported at once.

Unknown keys are errors (``extra="forbid"``) so a typo never turns into a silently ignored
option; each problem names its field path.
"""

from __future__ import annotations

import difflib
import re
from enum import StrEnum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

REMOTE_SCHEMES = ("s3://", "gs://")
MODEL_SCHEME = "hf://"  # models and tokenizers: jobs.common.model_source
DATASET_SCHEME = "hf://datasets/"  # dataset sources: jobs.prepare.hub
HUB_FORMS = {MODEL_SCHEME: "hf://org/name[@revision]", DATASET_SCHEME: "hf://datasets/org/name[@revision]"}


class SpecError(ValueError):
    """A spec that cannot be used; ``problems`` holds one ``path: message`` line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid spec:\n" + "\n".join(f"  - {p}" for p in problems))


class SpecModel(BaseModel):
    """Base of every spec model: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True)


_M = TypeVar("_M", bound=SpecModel)


def check_uri(uri: str, schemes: tuple[str, ...] = REMOTE_SCHEMES) -> str:
    """A local path, s3:// or gs://: the only places jobs read and write."""
    if not uri.strip():
        raise ValueError("must not be empty")
    if "://" in uri and not uri.startswith(schemes):
        hint = "".join(f", or {HUB_FORMS[scheme]}" for scheme in schemes if scheme in HUB_FORMS)
        raise ValueError(f"unsupported URI {uri!r}: use a local path, s3://bucket/key or gs://bucket/key{hint}")
    return uri


def check_model_uri(uri: str) -> str:
    """Where a model or tokenizer is: a data location, or a Hugging Face id (`jobs.common.model_source`)."""
    return check_uri(uri, (*REMOTE_SCHEMES, MODEL_SCHEME))


def check_source_uri(uri: str) -> str:
    """Where a dataset source is: a data location, or a dataset on the Hugging Face Hub (`jobs.prepare.hub`)."""
    return check_uri(uri, (*REMOTE_SCHEMES, DATASET_SCHEME))


# A location a job reads or writes.
Uri = Annotated[str, Field(min_length=1), AfterValidator(check_uri)]
# A dataset source: also `hf://datasets/org/name[@revision][/path/in/repo]`.
SourceUri = Annotated[str, Field(min_length=1), AfterValidator(check_source_uri)]
# A model or tokenizer: also `hf://org/name[@revision]`, or a bare `org/name` that is no local path.
ModelUri = Annotated[str, Field(min_length=1), AfterValidator(check_model_uri)]
# A dataset or run name: it becomes a directory name, so no separators and no leading dot.
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


def fields_at(model: type[BaseModel], loc: tuple) -> set[str]:
    """The field names a document may hold at `loc` (list indexes skipped, unions merged)."""
    models = {model}
    for part in loc:
        if isinstance(part, int):
            continue
        nested = {a for m in models if (field := m.model_fields.get(part)) for a in _models_in(field.annotation)}
        # Not a field: the tag pydantic puts in the path of a discriminated union's member.
        models = nested or {m for m in models if getattr(m.model_fields.get("kind"), "default", None) == part}
    return {name for m in models for name in m.model_fields}


def _models_in(annotation: Any) -> set[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    return {m for arg in get_args(annotation) for m in _models_in(arg)}


def format_errors(err: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One `path: message` line per problem; an unknown key names the nearest known one."""
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<spec>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and model is not None:
            known = fields_at(model, e["loc"][:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1, cutoff=0.6)
            msg = f"unknown field: did you mean {close[0]!r}?" if close else \
                f"unknown field: the fields here are {', '.join(sorted(known))}"
        problems.append(f"{path}: {msg}")
    return problems


def parse_spec_text(text: str, source: str = "<inline>") -> dict[str, Any]:
    """YAML (a superset of JSON) safe-loaded into a mapping."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError([f"{source}: not valid YAML/JSON: {e}"]) from e
    if not isinstance(data, dict):
        raise SpecError([f"{source}: the spec must be a mapping of fields, got {type(data).__name__}"])
    return data


def read_document(spec: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A spec document from a mapping, a file path or s3:// / gs:// URI, or an inline JSON/YAML string."""
    if isinstance(spec, dict):
        return spec
    text = str(spec)
    if text.lstrip().startswith("{"):
        return parse_spec_text(text)
    if text.startswith(REMOTE_SCHEMES):  # how the control plane hands specs to jobs on a cluster
        from jobs.common import storage

        fs, path = storage.filesystem(text)
        return parse_spec_text(storage.read_bytes(fs, path).decode(), text)
    path = Path(text)
    if path.is_file():
        return parse_spec_text(path.read_text(), str(path))
    raise SpecError([f"<spec>: {text!r} is neither a readable file nor inline JSON"])


def validate(model: type[_M], data: dict[str, Any]) -> _M:
    """Validate a document against a spec model; every problem is reported at once."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_errors(e, model)) from None


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Annotated:  # a constrained type reads as what it constrains
        return _type_name(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return " \\| ".join(_type_name(arg) for arg in get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return " \\| ".join(m.value for m in annotation)
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(?:[\w]+\.)+(\w+)", r"\1", str(annotation)).replace("|", "\\|")


def reference_markdown(models: tuple[type[SpecModel], ...]) -> str:
    """The field reference of spec models, generated from the models (the docs' spec references)."""
    out = []
    for model in models:
        out += [f"### `{model.__name__}`", "", (model.__doc__ or "").strip(), "",
                "| field | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            kind = _type_name(field.annotation)
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = f"`{field.default_factory.__name__}()`"
            else:
                default = f"`{getattr(field.default, 'value', field.default)}`"
            out.append(f"| `{name}` | `{kind}` | {default} | {(field.description or '').replace('|', chr(92) + '|')} |")
        out.append("")
    return "\n".join(out)
