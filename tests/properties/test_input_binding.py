"""``pgflow._check_input`` agrees with Python's ``Signature.bind`` on every signature.

A start from SQL is refused when its input could not bind to the workflow's
parameters as announced by its workers. The check has a fast path for an array
that binds (evaluated without running a statement) in front of the full one;
either way the answer must be Python's: for random signatures of every parameter
kind, and arrays and objects of random length and names, the procedure raises
(PF002) exactly when ``inspect.Signature.bind`` raises ``TypeError``.
"""

from __future__ import annotations

import inspect
from typing import Any

import psycopg
from hypothesis import given
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from pgflow.codec import Signature
from tests.support.sqlkit import BAD_ARGUMENT

P = inspect.Parameter
NAMES = ["a", "b", "c", "d", "e", "f"]
KIND_ORDER = [P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD, P.VAR_POSITIONAL, P.KEYWORD_ONLY,
              P.VAR_KEYWORD]


@st.composite
def signatures(draw: st.DrawFn) -> inspect.Signature:
    """A valid Python signature: kinds in order, at most one of each var kind, defaults
    only at the end of the positional ones."""
    kinds = sorted(draw(st.lists(st.sampled_from(KIND_ORDER), max_size=len(NAMES))),
                   key=KIND_ORDER.index)
    kinds = [k for i, k in enumerate(kinds)
             if k not in (P.VAR_POSITIONAL, P.VAR_KEYWORD) or k not in kinds[:i]]
    params, defaulted = [], False
    for name, kind in zip(NAMES, kinds, strict=False):
        if kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            params.append(P(name, kind))
            continue
        positional = kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
        default = draw(st.booleans()) or (positional and defaulted)
        defaulted = defaulted or (positional and default)
        params.append(P(name, kind, default=0) if default else P(name, kind))
    return inspect.Signature(params)


def announced(signature: inspect.Signature) -> list[dict[str, Any]]:
    """The parameters as a worker announces them for a function of ``signature``."""
    def fn(*args: Any, **kwargs: Any) -> None: ...
    fn.__signature__ = signature  # type: ignore[attr-defined]
    return Signature(fn).describe()


def python_binds(signature: inspect.Signature, data: Any) -> bool:
    try:
        if isinstance(data, list):
            signature.bind(*data)
        else:
            signature.bind(**data)
    except TypeError:
        return False
    return True


def sql_binds(conn: psycopg.Connection[Any], params: list[dict[str, Any]], data: Any) -> bool:
    try:
        with conn.transaction():
            conn.execute("select pgflow._check_input('wf', '1', %s, %s)",
                         (Jsonb(params), Jsonb(data)))
    except psycopg.Error as exc:
        assert exc.sqlstate == BAD_ARGUMENT, exc
        return False
    return True


@given(signature=signatures(), length=st.integers(0, 7),
       keys=st.lists(st.sampled_from([*NAMES, "zz"]), unique=True, max_size=7))
def test_sql_refuses_an_input_exactly_when_python_cannot_bind_it(conn, signature, length, keys):
    params = announced(signature)
    array = list(range(length))
    assert sql_binds(conn, params, array) == python_binds(signature, array), (signature, array)
    named = {k: 1 for k in keys}
    if quirk(signature, named):
        return
    assert sql_binds(conn, params, named) == python_binds(signature, named), (signature, named)


def quirk(signature: inspect.Signature, named: dict[str, Any]) -> bool:
    """A positional-only parameter's name given by keyword beside ``**kwargs``: a call
    puts it in ``**kwargs`` (and so does the check), but ``Signature.bind`` of Python
    3.11 refuses it."""
    kinds = {p.name: p.kind for p in signature.parameters.values()}
    return P.VAR_KEYWORD in kinds.values() and any(
        kinds.get(k) == P.POSITIONAL_ONLY for k in named)
