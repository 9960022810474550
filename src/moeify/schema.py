"""Dataclass configs as the one schema of flags, YAML recipes and Python calls.

A config may nest option groups (dataclasses inside dataclasses); every leaf field has a name that
is unique across the whole tree, so a recipe section and the command line are flat mappings of leaf
names. Types (int, float, bool, str, Path, Optional, Literal) are checked here, in one place.
"""

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import math
import typing
from pathlib import Path
from typing import Any, Literal

from moeify.errors import MoeifyError


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of a number: low/high bounds, each inclusive or not; None for no bound."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def __call__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        return self.high is None or value < self.high or (value == self.high and self.high_inclusive)

    def describe(self) -> str:
        if self.high is None:
            return f"{'at least' if self.low_inclusive else 'greater than'} {_number(self.low)}"
        left, right = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def at_least(low: float) -> Range:
    return Range(low)


def positive() -> Range:
    return Range(0, low_inclusive=False)


def seed_range() -> Range:
    """A random seed: what torch, numpy and Python's random all take."""
    return Range(0, 2**32 - 1)


def fraction(low_inclusive: bool = True, high_inclusive: bool = True) -> Range:
    return Range(0, 1, low_inclusive, high_inclusive)


@dataclasses.dataclass(frozen=True)
class Leaf:
    name: str
    path: tuple[str, ...]  # attribute path from the root config
    kind: Any  # the annotated type
    default: Any
    doc: str
    range: Range | None = None  # from the owning dataclass's RANGES


def _is_group(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


@functools.cache
def field_docs(schema: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (and its bases), as written in the source."""
    docs: dict[str, str] = {}
    for cls in reversed(schema.__mro__[:-1]):
        try:
            body = ast.parse(inspect.getsource(cls)).body[0].body
        except (OSError, TypeError):
            continue
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


@functools.cache
def leaves(schema: type, prefix: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> tuple[Leaf, ...]:
    """Every leaf field; a group field's metadata {"skip": names} hides those leaves of the group
    (they keep their defaults), so two groups may share a name once. Computed once per schema
    (the docstrings come from parsing the source)."""
    hints = typing.get_type_hints(schema)
    docs = field_docs(schema)
    found: list[Leaf] = []
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if _is_group(kind):
            found.extend(leaves(kind, (*prefix, f.name), tuple(f.metadata.get("skip", ()))))
            continue
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        found.append(Leaf(f.name, (*prefix, f.name), kind, default, docs.get(f.name, ""), getattr(schema, "RANGES", {}).get(f.name)))
    return tuple(found)


def leaf_names(schema: type) -> set[str]:
    return {leaf.name for leaf in leaves(schema)}


def unknown_keys_error(keys: set[str], known: set[str], where: str) -> MoeifyError:
    hints = []
    for key in sorted(keys):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return MoeifyError(f"unknown key(s) in {where}: {', '.join(hints)}")


def from_flat(schema: type, values: dict[str, Any], where: str = "the settings", **fixed: Any):
    """Build `schema` from a flat mapping of leaf names (unknown keys refused, types checked);
    `fixed` gives required root fields that are not part of the flat namespace."""
    checked = check_values(schema, values, where)
    missing = [leaf.name for leaf in leaves(schema) if leaf.default is dataclasses.MISSING and leaf.name not in checked
               and leaf.name not in fixed]
    if missing:
        raise MoeifyError(f"{where} lacks {', '.join(missing)}")
    return _construct(schema, checked, (), fixed)


def is_given(config: Any, name: str, default: Any = dataclasses.MISSING) -> bool:
    """Whether a leaf was set by the user: named in the flat settings a config was made from (flags,
    recipe); for a config made in Python, whether it differs from `default`."""
    given = getattr(config, "_given", None)
    if given is not None:
        return name in given
    return default is not dataclasses.MISSING and to_flat(config).get(name) != default


def given_names(config: Any) -> frozenset[str]:
    """The leaves the user set (see is_given)."""
    given = getattr(config, "_given", None)
    if given is not None:
        return given
    flat = to_flat(config)
    as_flat = lambda value: str(value) if isinstance(value, Path) else value  # noqa: E731 (to_flat's form)
    return frozenset(leaf.name for leaf in leaves(type(config))
                     if leaf.default is dataclasses.MISSING or flat[leaf.name] != as_flat(leaf.default))


def with_given(config: Any, names: set[str] | frozenset[str]):
    """`config` (a shallow copy) recording `names` as the leaves the user set."""
    copied = copy.copy(config)
    object.__setattr__(copied, "_given", frozenset(names))
    return copied


def check_values(schema: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` (all or part of the settings) in their leaves' types; unknown keys, wrong types or
    ranges refused in one line."""
    by_name = {leaf.name: leaf for leaf in leaves(schema)}
    unknown = set(values) - set(by_name)
    if unknown:
        raise unknown_keys_error(unknown, set(by_name), where)
    return {name: coerce(by_name[name], value, where) for name, value in values.items()}


def _construct(schema: type, values: dict[str, Any], prefix: tuple[str, ...], fixed: dict[str, Any], skip: tuple[str, ...] = ()):
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for f in dataclasses.fields(schema):
        if _is_group(hints[f.name]):
            kwargs[f.name] = _construct(hints[f.name], values, (*prefix, f.name), {}, tuple(f.metadata.get("skip", ())))
        elif f.name in values and f.name not in skip:
            kwargs[f.name] = values[f.name]
        elif not prefix and f.name in fixed:
            kwargs[f.name] = fixed[f.name]
    config = schema(**kwargs)
    object.__setattr__(config, "_given", frozenset(leaf_names(schema) & set(values)))  # see is_given
    return config


def validate(config: Any, where: str = "the settings") -> None:
    """Check every leaf of a config built in Python (flags and recipes are checked by from_flat)."""
    for leaf in leaves(type(config)):
        value = config
        for name in leaf.path:
            value = getattr(value, name)
        coerce(leaf, value, where)


def to_flat(config: Any) -> dict[str, Any]:
    """The leaf values of a config, by leaf name (Paths as strings), in field order."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat(value))
        else:
            out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def replace_flat(config: Any, **values: Any):
    """A copy of `config` with the given leaf values replaced (types checked); the leaves counted as given
    are those of `config` and the replaced ones."""
    replaced = from_flat(type(config), {**{k: v for k, v in to_flat(config).items() if k in leaf_names(type(config))}, **values})
    return with_given(replaced, given_names(config) | set(values))


def _choices(kind: Any) -> tuple | None:
    if typing.get_origin(kind) is Literal:
        return typing.get_args(kind)
    return None


def base_type(kind: Any) -> Any:
    """int for `int | None`, the Literal for `Literal[...] | None`."""
    inner = [a for a in typing.get_args(kind) if a is not type(None)] if typing.get_origin(kind) in (typing.Union, _UnionType) else []
    return inner[0] if len(inner) == 1 else kind


_UnionType = type(int | None)


def optional(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, _UnionType) and type(None) in typing.get_args(kind)


def coerce(leaf: Leaf, value: Any, where: str) -> Any:
    """`value` as the leaf's type, or a one-line error naming the key, the value and what it must be."""
    if value is None:
        if optional(leaf.kind):
            return None
        raise MoeifyError(f"{_key(leaf, where)} must not be empty")
    kind = base_type(leaf.kind)
    choices = _choices(kind)
    if choices is not None:
        if value not in choices:
            raise MoeifyError(f"{_key(leaf, where)} is {value!r}; choose one of: {', '.join(map(str, choices))}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind in (int, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int)):
            value = kind(value)
            if kind is int and abs(value) >= 2**63:
                raise MoeifyError(f"{_key(leaf, where)} is {value}; it must be smaller than 2**63 in size")
            if not math.isfinite(value):
                raise MoeifyError(f"{_key(leaf, where)} is {value!r}; it must be a finite number")
            if leaf.range is not None and not leaf.range(value):
                raise MoeifyError(f"{_key(leaf, where)} is {value!r}; it must be {leaf.range.describe()}")
            return value
    elif kind in (str, Path):
        if isinstance(value, (str, Path)):
            return _text(leaf, value, where, kind)
    elif typing.get_origin(kind) is list:
        if isinstance(value, (list, tuple)):
            element = typing.get_args(kind)[0]
            return [_text(leaf, item, where, element) for item in value] if element in (str, Path) else list(value)
    else:
        return value
    raise MoeifyError(f"{_key(leaf, where)} is {value!r}; it must be {_type_name(kind)}")


def _text(leaf: Leaf, value: Any, where: str, kind: type) -> Any:
    """A str or Path setting (or list element) as `kind`: text that is not blank, nothing else."""
    if not isinstance(value, (str, Path)):
        raise MoeifyError(f"{_key(leaf, where)} holds {value!r}; each element must be {_type_name(kind)}")
    _not_blank(leaf, str(value), where, kind)
    return kind(value)


def _not_blank(leaf: Leaf, text: str, where: str, kind: type) -> None:
    """No setting takes an empty string: an empty path would be the current directory."""
    if not text.strip():
        raise MoeifyError(f"{_key(leaf, where)} is {text!r}; give {_type_name(kind)} that is not empty")


def _key(leaf: Leaf, where: str) -> str:
    return f"--{leaf.name.replace('_', '-')}" if where == COMMAND_LINE else f"{leaf.name} in {where}"


COMMAND_LINE = "the command line"


def _type_name(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(kind, str(kind))
