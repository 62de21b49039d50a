"""Config plumbing of both programs: frozen sections, the model section, ``--set`` overrides and
error messages that name the key path.

A program is described by one YAML file plus ``--set a.b=value`` overrides, read into frozen
pydantic models (:class:`Section`): unknown keys are rejected with the list of valid ones, numbers
must be finite, and every error names its key path (``models.1.temperature``). A section that
configures a library feature does not re-declare the library's options: :func:`options_section`
builds it from the library's frozen dataclass, and ``section.options(...)`` converts back.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from isdelta.program.errors import ConfigError

__all__ = [
    "ModelConfig",
    "Section",
    "apply_overrides",
    "checked_by",
    "format_errors",
    "load_yaml_config",
    "options_section",
]

# where a model can be put: torch device strings the programs support
_DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")
_MODEL_FIX = (
    "give a local HF folder, a .gguf file, a builtin name (smollm2-135m-instruct) or a hub id "
    "(fetched only with allow_download: true)"
)


class Section(BaseModel):
    """A config section: frozen, unknown keys rejected, numbers finite (``.inf`` and ``.nan`` are
    refused here, not after minutes of work)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ModelConfig(Section):
    """Where a model comes from and how it is loaded (both programs)."""

    path: str = Field(description="builtin name, .gguf file, local HF folder, or hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False  # run code shipped with a checkpoint: only when said in so many words
    allow_download: bool = False  # a hub id may be fetched from the network

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:N, mps, xpu or xpu:N")
        return value

    def check_device(self, key: str = "model") -> None:
        """Raise ConfigError when ``device`` is not on this machine (before any model loads)."""
        import torch

        dev = torch.device(self.device)
        if dev.type == "cpu":
            return
        backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": torch.backends.mps}[dev.type]
        if backend is None or not backend.is_available():
            raise ConfigError(
                f"{key}.device: {self.device} is not available on this machine",
                f"torch {torch.__version__} sees no {dev.type} device",
                "set device: cpu, or run where that device is",
            )
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"{key}.device: {self.device} does not exist",
                f"this machine has {count} {dev.type} device(s), numbered from 0",
                f"use {dev.type}:0 … {dev.type}:{count - 1}",
            )

    def _kwargs(self) -> dict[str, Any]:
        return {"trust_remote_code": self.trust_remote_code, "allow_download": self.allow_download}

    def load(self, key: str = "model"):
        """``(model, tokenizer)`` by :func:`isdelta.engine.load_model`; a failure is a ConfigError
        naming ``key.path`` (or ``key.device``)."""
        from isdelta.engine import load_model

        self.check_device(key)
        try:
            return load_model(self.path, dtype=self.dtype, device=self.device, **self._kwargs())
        except (OSError, ValueError) as e:
            fix = "check the path" if isinstance(e, FileNotFoundError) else _MODEL_FIX
            raise ConfigError(f"{key}.path: cannot load the model {self.path!r}", str(e), fix) from e

    def load_tokenizer(self, key: str = "model"):
        """The model's tokenizer alone (no weights), for checks before any work; errors as :meth:`load`."""
        from isdelta.engine import load_tokenizer

        try:
            return load_tokenizer(self.path, **self._kwargs())
        except (OSError, ValueError) as e:
            fix = "check the path" if isinstance(e, FileNotFoundError) else _MODEL_FIX
            raise ConfigError(f"{key}.path: cannot load the tokenizer of {self.path!r}", str(e), fix) from e


# ---------------------------------------------------------------------------- library options
def options_section(
    name: str, options: type, *, derived: Sequence[str] = (), **extra: tuple[Any, Any]
) -> type[Section]:
    """A :class:`Section` whose keys are the fields of the library's option dataclass ``options``.

    Types and defaults come from the dataclass (declared once, there); each value is checked by
    constructing ``options`` with that one field set, so the dataclass's own checks run at config
    time and their messages carry the key path. ``derived`` fields are not config keys (the
    program fills them from other sections); ``extra`` adds program-only keys as
    ``name=(type, default)``. ``section.options(**derived_values)`` returns the dataclass.
    """
    hints = typing.get_type_hints(options)
    keys = [f for f in dataclasses.fields(options) if f.name not in derived]
    fields: dict[str, Any] = {}
    for f in keys:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        fields[f.name] = (hints[f.name], default)

    def check(cls, value, info):
        return _check_one(options, info.field_name, value)

    def to_options(self, **values):
        return options(**{f.name: getattr(self, f.name) for f in keys}, **values)

    section = create_model(
        name,
        __base__=Section,
        __doc__=f"The config keys of :class:`{options.__name__}`.",
        __validators__={"_check": field_validator(*fields)(check)},
        **fields,
        **extra,
    )
    section.options = to_options
    return section


def checked_by(check: Callable[..., Any] | str) -> AfterValidator:
    """A key whose range the library declares: ``Annotated[float, checked_by(LogitTransform)]``.

    Each value is passed to ``check`` as the one keyword named like the key (a library dataclass,
    or a function that raises ``ValueError``), so the range and its reason live in the library,
    once, and the config error names the key path. ``check`` may be ``"module:name"``, imported
    when a value is first checked (a config module that must not import torch at import time).
    """

    def validate(value, info):
        target = check
        if isinstance(target, str):
            module, _, name = target.partition(":")
            target = getattr(importlib.import_module(module), name)
        return _check_one(target, info.field_name, value)

    return AfterValidator(validate)


def _check_one(check: Callable[..., Any], name: str, value):
    """``value`` after ``check(name=value)`` accepted it; a TypeError or ArithmeticError becomes a
    ValueError (which pydantic reports with the key path; others would escape it)."""
    try:
        check(**{name: value})
    except (TypeError, ArithmeticError) as e:  # e.g. int(inf) in a check
        raise ValueError(str(e)) from e
    return value


# ---------------------------------------------------------------------------- reading configs
def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (a pydantic error location) inside `model`."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        sub = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sub:
            break
        model = sub[0]
    return sorted(model.model_fields)


def format_errors(err: ValidationError, root: type[BaseModel]) -> str:
    """One line per problem, each naming its key path (list items by index: ``models.1.path``)."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(root, tuple(p for p in loc[:-1] if not isinstance(p, int)))
            lines.append(f"{path}: unknown key. Valid keys here: {', '.join(valid)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        said = isinstance(got, (dict, list)) or e["type"] == "missing" or "; got " in msg  # a library check says it
        shown = "" if said else f" (got {got!r})"
        lines.append(f"{path}: {msg}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; a numeric part indexes a list (``models.1.temperature``)."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"--set {dotted}: {k!r} is not an index of a list of {len(node)}")
            k = int(k)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {keys[depth - 1]} is a value, not a section")
        if last:
            node[k] = value
        else:
            if isinstance(node, dict):
                node.setdefault(k, {})
            node = node[k]


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=value`` strings (values parsed as YAML: ``1e-4``, ``true``, ``[a, b]``)."""
    raw = json.loads(json.dumps(raw))  # deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set update.lr=1e-4")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {item}: the value is not valid YAML",
                _yaml_problem(e),
                "quote a string that holds YAML syntax, e.g. --set 'data.path=\"a: b.jsonl\"'",
            ) from None
        _set_path(raw, key.strip(), parsed)
    return raw


def _yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what, from a YAML parser error (line and column counted from 1)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def load_yaml_config(root: type[BaseModel], source: str | Path | dict, overrides: Sequence[str] = ()):
    """Read a YAML file (or take a dict), apply ``--set`` overrides, validate it as `root`."""
    if isinstance(source, dict):
        raw = source
    else:
        raw = _read_yaml(Path(source))
    raw = apply_overrides(raw, overrides)
    try:
        return root.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, root)) from None


def _read_yaml(path: Path) -> dict:
    """The config file as a dict; every way it can be unreadable is a ConfigError naming it."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist", fix="check the path (configs/ holds examples)")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file", fix="pass the YAML file itself")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text", str(e), "save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML", _yaml_problem(e), "fix that line") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read", e.strerror, "check its permissions") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path}: the top level is a {type(raw).__name__}",
            "a config is a mapping of sections",
            "start it with sections such as model:, data:",
        )
    return raw
