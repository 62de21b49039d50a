"""What the two programs (``isdelta.run``, ``isdelta.score``) share: config plumbing, the stage
timer and one command-line ``main``.

A program is described by one YAML file plus ``--set a.b=value`` overrides, read into frozen
pydantic models (:class:`Section`): unknown keys are rejected with the list of valid ones, and
every error names its key path (``models.1.temperature``). A section that configures a library
feature does not re-declare the library's options: :func:`options_section` builds it from the
library's frozen dataclass, and ``section.options(...)`` converts back.

The library (``engine`` … ``integrations``) never imports this module; the programs do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

__all__ = [
    "ConfigError",
    "ModelConfig",
    "Program",
    "Section",
    "apply_overrides",
    "format_errors",
    "load_yaml_config",
    "main",
    "options_section",
    "stage",
]


class ConfigError(ValueError):
    """A config file or override that does not validate; the message lists every problem."""


class Section(BaseModel):
    """A config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(Section):
    """Where a model comes from and how it is loaded (both programs)."""

    path: str = Field(description="builtin name, .gguf file, local HF folder, or hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False  # run code shipped with a checkpoint: only when said in so many words
    allow_download: bool = False  # a hub id may be fetched from the network

    def load(self):
        """``(model, tokenizer)`` by :func:`isdelta.engine.load_model` with these settings."""
        from isdelta.engine import load_model

        return load_model(
            self.path,
            dtype=self.dtype,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
            allow_download=self.allow_download,
        )


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
        try:
            options(**{info.field_name: value})  # the dataclass's own checks of this one value
        except TypeError as e:  # pydantic reports ValueErrors with the key path
            raise ValueError(str(e)) from e
        return value

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
        shown = "" if isinstance(got, (dict, list)) or e["type"] == "missing" else f" (got {got!r})"
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
        _set_path(raw, key.strip(), yaml.safe_load(value))
    return raw


def load_yaml_config(root: type[BaseModel], source: str | Path | dict, overrides: Sequence[str] = ()):
    """Read a YAML file (or take a dict), apply ``--set`` overrides, validate it as `root`."""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    raw = apply_overrides(raw, overrides)
    try:
        return root.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, root)) from None


# ---------------------------------------------------------------------------- running
@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Announce a stage on stderr and record its wall time in ``timings[name]``."""
    print(f"[isdelta] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    print(f"[isdelta] {name} done in {timings[name]:.1f} s", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Program:
    """A command line: ``prog CONFIG.yaml [--set KEY=VALUE ...] [--out DIR]``.

    Attributes
    ----------
    prog, description : what ``--help`` shows.
    set_example : an override for the ``--set`` help, e.g. ``update.lr=1e-4``.
    load : (config path, overrides) -> config.
    execute : (config, output folder or None) -> anything (the folder defaults to the config's).
    errors : exception type -> (exit code, message prefix): anticipated failures, printed as
        ``error: <prefix><message>`` without a traceback.
    """

    prog: str
    description: str
    set_example: str
    load: Callable[[str, Sequence[str]], Any]
    execute: Callable[[Any, Path | None], Any]
    errors: Mapping[type[BaseException], tuple[int, str]]


def main(program: Program, argv: Sequence[str] | None = None) -> int:
    """Parse the command line, load the config, run the program; return the exit code."""
    ap = argparse.ArgumentParser(prog=program.prog, description=program.description)
    ap.add_argument("config", help="the YAML config (see configs/)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {program.set_example} (repeatable)",
    )
    ap.add_argument("--out", help="output folder (default: output.dir of the config)")
    args = ap.parse_args(argv)
    try:
        cfg = program.load(args.config, args.set)
        program.execute(cfg, Path(args.out) if args.out else None)
    except tuple(program.errors) as e:
        code, prefix = next(v for t, v in program.errors.items() if isinstance(e, t))
        print(f"error: {prefix}{e}", file=sys.stderr)
        return code
    return 0
