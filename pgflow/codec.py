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


def to_json(value: Any, what: str) -> Any:
    """``value`` as JSON-compatible Python data; ``what`` names it in errors."""
    try:
        data = pydantic_core.to_jsonable_python(value, serialize_unknown=False)
    except pydantic_core.PydanticSerializationError as exc:
        raise errors.EncodingError(f"{what} cannot be encoded as JSON: {exc}") from None
    _reject_non_finite(data, what)
    return data


def dumps(value: Any, what: str) -> str:
    """``value`` encoded as JSON text, ready for a ``jsonb`` parameter."""
    return json.dumps(to_json(value, what), separators=(",", ":"), allow_nan=False)


def _reject_non_finite(data: Any, what: str) -> None:
    # JSON has no NaN or Infinity; jsonb would refuse them later, far from the cause.
    if isinstance(data, float) and not math.isfinite(data):
        raise errors.EncodingError(f"{what} cannot be encoded as JSON: {data} is not a JSON number")
    if isinstance(data, list):
        for item in data:
            _reject_non_finite(item, what)
    elif isinstance(data, dict):
        for item in data.values():
            _reject_non_finite(item, what)


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
