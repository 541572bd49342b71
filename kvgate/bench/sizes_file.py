"""Workload sizes from a TOML file (`kvgate bench --sizes FILE`), over a preset's.

The shipped workloads are one shape each; a fleet's own traffic is another.
A sizes file changes any field of any workload's spec
(`kvgate.bench.workloads`), one table per workload, named as in
`--workloads` (`mixed`, `shared-prefix`, ...), plus the engines' context limit
at the top level:

    max_model_len = 4096

    [mixed]
    groups = 24
    prefix_tokens = 512
    one_offs = 120

Fields not named keep the preset's value (the full run's, or `--quick`'s).
A table, field or value the specs do not have is an error that names it, so
a typo never runs a benchmark on sizes nobody asked for.

Not here: the presets (`kvgate.bench.config`), building the traces
(`kvgate.bench.workloads`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvgate.bench.workloads import WorkloadSizes

#: Count fields that may be 0 (a workload part left out); every other count is at least 1.
_MAY_BE_ZERO = frozenset({("mixed", "one_offs"), ("shared-cache", "hot_requests"), ("shared-cache", "chats")})


class SizesError(ValueError):
    """A sizes file that cannot be read or does not fit the workloads' specs."""


def load_sizes(path: Path, base: WorkloadSizes) -> WorkloadSizes:
    """`base` with the fields `path` sets replaced.

    Raises:
        SizesError: the file is missing or not TOML, or names a table,
            field or value the specs do not have.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SizesError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SizesError(f"{path} is not TOML: {exc}") from None
    return apply_sizes(data, base, source=str(path))


def apply_sizes(data: Mapping[str, Any], base: WorkloadSizes, *, source: str = "sizes") -> WorkloadSizes:
    """`base` with the fields of `data` (the parsed file) replaced; see the module docstring."""
    specs = [field.name for field in dataclasses.fields(base) if field.name != "max_model_len"]
    tables = {name.replace("_", "-"): name for name in specs}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key == "max_model_len":
            changes[key] = _number(source, key, value, current=base.max_model_len, zero=False)
            continue
        attr = tables.get(key) or (key if key in tables.values() else None)
        if attr is None:
            known = ", ".join(["max_model_len", *tables])
            raise SizesError(f"{source}: no workload {key!r}; known: {known}")
        if not isinstance(value, Mapping):
            raise SizesError(f"{source}: [{key}] must be a table of fields, not {type(value).__name__}")
        name = attr.replace("_", "-")
        changes[attr] = _spec(source, name, getattr(base, attr), value)
    return dataclasses.replace(base, **changes)


def _spec(source: str, workload: str, spec: Any, values: Mapping[str, Any]) -> Any:
    fields = {field.name for field in dataclasses.fields(spec)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise SizesError(f"{source}: [{workload}] has no field {key!r}; known: {', '.join(sorted(fields))}")
        zero = (workload, key) in _MAY_BE_ZERO
        changes[key] = _number(source, f"{workload}.{key}", value, current=getattr(spec, key), zero=zero)
    return dataclasses.replace(spec, **changes)


def _number(source: str, where: str, value: Any, *, current: Any, zero: bool) -> Any:
    """`value` checked against the kind of the field's current value."""
    if isinstance(current, bool) or isinstance(value, bool):
        raise SizesError(f"{source}: {where} must be a number, not {value!r}")
    if isinstance(current, int):
        if not isinstance(value, int):
            raise SizesError(f"{source}: {where} must be a whole number, not {value!r}")
        least = 0 if zero else 1
        if value < least:
            raise SizesError(f"{source}: {where} must be at least {least}, not {value}")
        return value
    if not isinstance(value, int | float):
        raise SizesError(f"{source}: {where} must be a number, not {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise SizesError(f"{source}: {where} must be above 0, not {value}")
    return float(value)
