"""Small shared helpers: atomic writes, append-only jsonl, run metadata, config dataclasses, seeding."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import tempfile
import types
import typing
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import yaml

from thinkforge.errors import ThinkforgeError

T = TypeVar("T")

TRACKED_PACKAGES = ("thinkforge", "torch", "transformers", "tokenizers", "math-verify", "openai", "vllm", "peft")


# ---------------------------------------------------------------- files

def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes a file so readers see the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yields a temp dir beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: str | Path, rows: list[dict[str, Any]] | dict[str, Any]) -> None:
    """Appends rows and flushes them to disk (append-only logs survive a kill)."""
    rows = [rows] if isinstance(rows, dict) else rows
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path, *, tolerate_partial_last_line: bool = False) -> list[dict[str, Any]]:
    """Reads jsonl; a malformed row raises an error naming file and line. A torn last line (a write
    interrupted by a kill) is skipped when `tolerate_partial_last_line` is set."""
    path = Path(path)
    if not path.exists():
        raise ThinkforgeError(f"{path}: file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if tolerate_partial_last_line and i == len(lines):
                break
            raise ThinkforgeError(f"{path}:{i}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ThinkforgeError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def ensure_writable_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ThinkforgeError(f"output directory {path} is not writable ({err.strerror})") from None
    return path


# ---------------------------------------------------------------- reproducibility

def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_metadata(config: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """What every result file records: config, its hash, seed, package versions, the machine (its numerics
    fingerprint and mode) and the code sandbox (an unsafe opt-in shows here)."""
    from thinkforge.numerics import machine_fingerprint, numerics_info
    from thinkforge.verify.sandbox import sandbox_metadata

    return {"config": config, "config_hash": config_hash(config), "seed": seed, "versions": package_versions(),
            "machine": machine_fingerprint(), "numerics": numerics_info(), "sandbox": sandbox_metadata()}


# ---------------------------------------------------------------- configs

def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ThinkforgeError as err:
                errors.append(str(err))
        raise ThinkforgeError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ThinkforgeError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, where) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ThinkforgeError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ThinkforgeError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ThinkforgeError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ThinkforgeError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ThinkforgeError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ThinkforgeError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build_config(cls: type[T], data: dict[str, Any] | None = None, where: str = "config") -> T:
    """Builds a config dataclass from a mapping, with type checks and a clear error on unknown keys."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ThinkforgeError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                              f"known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}: field {k!r}") for k, v in data.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ThinkforgeError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ThinkforgeError(f"{path}{line}: malformed YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ThinkforgeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs from the command line (`--set lr=3e-4 --set stages=1,2`); values parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ThinkforgeError(f"override {pair!r} must look like key=value")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe path, or the name of a recipe shipped in `thinkforge/recipes/`."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = Path(__file__).parent / "recipes" / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if shipped.exists():
        return shipped
    raise ThinkforgeError(f"recipe {name_or_path!r} not found (neither a file nor a shipped recipe)")


def load_config(cls: type[T], recipe: str | None = None, section: str | None = None,
                overrides: dict[str, Any] | None = None) -> T:
    """Config = dataclass defaults <- recipe YAML (optionally one section of it) <- command-line overrides."""
    data: dict[str, Any] = {}
    where = "config"
    if recipe:
        path = resolve_recipe(recipe)
        doc = load_yaml(path)
        where = str(path)
        if section is not None:
            doc = doc.get(section, {}) or {}
            where = f"{path}: section {section!r}"
            if not isinstance(doc, dict):
                raise ThinkforgeError(f"{where}: expected a mapping")
        data.update(doc)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(cls, data, where)


def asdict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
