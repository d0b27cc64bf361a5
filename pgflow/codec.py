"""JSON encoding of workflow inputs and step results.

Values are stored as plain JSON. On the way in, pydantic models, dataclasses,
``datetime``, ``UUID``, ``Decimal`` (and the rest of what pydantic can dump)
become JSON; on the way back they are re-validated from the type hints of the
function that receives them, so a step annotated ``-> Order`` returns an
``Order`` on replay too. A value that cannot be encoded is an
:class:`~pgflow.errors.EncodingError` at the point it is produced, never a
silently mangled payload.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any, get_type_hints

import pydantic
import pydantic_core

from pgflow import errors

_EMPTY = inspect.Parameter.empty


MAX_PAYLOAD_BYTES = 2 * 1024 * 1024
"""The largest JSON payload pgflow stores (2 MiB), as PostgreSQL stores it (``jsonb``).

The same limit as SQL ``pgflow.max_payload_bytes()``. Every workflow input,
step and workflow result, signal payload, state value and ``ctx.map`` item is
checked here before anything is sent, with an estimate of its ``jsonb`` size
that is never below the real one, so a value accepted here is never refused by
the database.
"""


def to_json(value: Any, what: str) -> Any:
    """``value`` as JSON-compatible Python data; ``what`` names it in errors.

    Raises :class:`~pgflow.errors.EncodingError` for what JSON (or PostgreSQL's
    ``jsonb``) cannot hold, and :class:`~pgflow.errors.PayloadTooLarge` past
    :data:`MAX_PAYLOAD_BYTES`.
    """
    try:
        data = pydantic_core.to_jsonable_python(value, serialize_unknown=False)
    except pydantic_core.PydanticSerializationError as exc:
        raise errors.EncodingError(f"{what} cannot be encoded as JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # e.g. "Maximum serialization depth exceeded"
        raise errors.EncodingError(f"{what} cannot be encoded as JSON: {exc}") from None
    size = stored_size(data, what)
    if size > MAX_PAYLOAD_BYTES:
        raise errors.PayloadTooLarge(
            f"{what} is too large: about {size} bytes as stored, over the limit of "
            f"{MAX_PAYLOAD_BYTES} bytes (pgflow.codec.MAX_PAYLOAD_BYTES)")
    return data


def dumps(value: Any, what: str) -> str:
    """``value`` encoded as JSON text, ready for a ``jsonb`` parameter."""
    return json.dumps(to_json(value, what), separators=(",", ":"), allow_nan=False)


# Sizes of PostgreSQL's jsonb format (src/backend/utils/adt/jsonb_util.c): a
# varlena header, then per container a 4-byte header and a 4-byte entry per
# element (and per key); strings are stored raw, numbers as `numeric` aligned to
# 4 bytes (up to 3 bytes of padding, a header of up to 8 bytes, 2 bytes per 4
# decimal digits), true/false/null in their entry alone.
_VARLENA = 4
_HEADER = 4
_ENTRY = 4
_PAD = 3
_NUMERIC_HEADER = 8


def _numeric_size(number: int | float) -> int:
    digits = len(repr(abs(number))) if isinstance(number, float) else len(str(abs(number)))
    return _PAD + _NUMERIC_HEADER + 2 * (digits // 4 + 2)


def _text_size(text: str, what: str) -> int:
    if "\x00" in text:
        raise errors.EncodingError(f"{what} cannot be stored: its text contains a NUL character "
                                   "(\\u0000), which PostgreSQL does not accept")
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise errors.EncodingError(f"{what} cannot be stored: its text contains a lone surrogate "
                                   "(not valid Unicode)") from None


def stored_size(data: Any, what: str) -> int:
    """An upper bound of the ``jsonb`` size of JSON ``data``, in bytes.

    Also the one walk that refuses what ``jsonb`` cannot hold: NaN and
    infinities, NUL characters and lone surrogates. Iterative, so any nesting
    depth pydantic accepted is measured without recursion.
    """
    size = _VARLENA + _HEADER + _ENTRY  # a top-level scalar is a one-element array
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += _text_size(item, what)
        elif item is None or isinstance(item, bool):
            pass
        elif isinstance(item, int):
            size += _numeric_size(item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise errors.EncodingError(
                    f"{what} cannot be encoded as JSON: {item} is not a JSON number")
            size += _numeric_size(item)
        elif isinstance(item, list):
            size += _PAD + _HEADER + _ENTRY * len(item)
            stack.extend(item)
        elif isinstance(item, dict):
            size += _PAD + _HEADER + 2 * _ENTRY * len(item)
            for key, value in item.items():
                size += _text_size(str(key), what)
                stack.append(value)
        else:  # to_jsonable_python only makes the types above
            raise errors.EncodingError(f"{what} cannot be encoded as JSON: {type(item).__name__}")
    return size


@lru_cache(maxsize=4096)
def _adapter(annotation: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(annotation)


def from_json(data: Any, annotation: Any, what: str) -> Any:
    """Validate JSON data back into ``annotation`` (no annotation: as is)."""
    if annotation is _EMPTY or annotation is Any or (annotation is None and data is None):
        return data
    try:
        return _adapter(annotation).validate_python(data)
    except pydantic.ValidationError as exc:
        raise errors.EncodingError(f"{what} does not match its type {annotation!r}: {exc}") from None
    except (TypeError, pydantic.PydanticSchemaGenerationError):
        return data  # an annotation pydantic cannot validate: keep the JSON value


_KIND_NAMES = {
    inspect.Parameter.POSITIONAL_ONLY: "positional_only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword_only",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}


class Signature:
    """How to encode the arguments of a function and decode them back.

    Arguments are stored as a JSON array (positional) or a JSON object (by
    parameter name), so runs can also be started from SQL with either form.
    """

    def __init__(self, fn: Callable[..., Any], skip_first: bool = False) -> None:
        self.fn = fn
        self.signature = inspect.signature(fn)
        params = list(self.signature.parameters.values())
        if skip_first:
            if not params:
                raise TypeError(f"{fn.__qualname__} must take a context as its first parameter")
            params = params[1:]
        self.parameters = params
        self.signature = self.signature.replace(parameters=params)
        try:
            hints = get_type_hints(fn)
        except Exception:  # unresolvable forward references: validate nothing
            hints = {}
        self.hints = {p.name: hints.get(p.name, _EMPTY) for p in params}
        self.return_hint = hints.get("return", _EMPTY)

    def describe(self) -> list[dict[str, Any]]:
        """The parameters as workers announce them (``pgflow.workflows.params``).

        ``pgflow.start`` checks every input against this, so a start that
        could not bind to the function is refused before a run is written.
        """
        return [{"name": p.name, "kind": _KIND_NAMES[p.kind],
                 "required": p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
                for p in self.parameters]

    def encode_args(self, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> Any:
        """Check that the arguments fit the signature and encode them."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{what}: {exc}") from None
        if not kwargs:
            return to_json(list(args), f"{what} arguments")
        named = any(p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) for p in self.parameters)
        if named:
            raise TypeError(f"{what}: pass positional-only and *args parameters positionally, "
                            "without keyword arguments")
        return to_json(dict(bound.arguments), f"{what} arguments")

    def decode_args(self, data: Any, what: str) -> tuple[list[Any], dict[str, Any]]:
        """Rebuild ``(args, kwargs)`` from stored JSON, validated against the hints."""
        if isinstance(data, list):
            args, kwargs = list(data), {}
        elif isinstance(data, dict):
            args, kwargs = [], dict(data)
        else:
            raise errors.EncodingError(f"{what}: input must be a JSON array or object")
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise errors.EncodingError(f"{what}: input does not fit the signature: {exc}") from None
        for name, value in list(bound.arguments.items()):
            param = self.signature.parameters[name]
            hint = self.hints.get(name, _EMPTY)
            if param.kind is param.VAR_POSITIONAL:
                bound.arguments[name] = tuple(from_json(v, hint, f"{what} argument {name}") for v in value)
            elif param.kind is param.VAR_KEYWORD:
                bound.arguments[name] = {k: from_json(v, hint, f"{what} argument {k}")
                                         for k, v in value.items()}
            else:
                bound.arguments[name] = from_json(value, hint, f"{what} argument {name}")
        return list(bound.args), dict(bound.kwargs)

    def decode_result(self, data: Any, what: str) -> Any:
        return from_json(data, self.return_hint, what)
