"""SQLAlchemy inside a transactional step: a ``Session`` on the step's own connection.

.. code-block:: python

    @pgflow.step(transactional=True)
    def reserve(conn: psycopg.Connection, order_id: int) -> int:
        with pgflow.orm.session(conn) as session:
            order = session.get(Order, order_id)
            order.status = "reserved"
            return order.id

The session's writes are flushed when the block ends and commit with the
step's checkpoint (or roll back with it): ``session.commit()`` inside only
flushes, and ``session.rollback()`` leaves the transaction to fail the step.
Needs SQLAlchemy 2 with the psycopg (3) driver; the ``Session`` options
(``expire_on_commit=``, ...) pass through.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

_lent: contextvars.ContextVar[Any] = contextvars.ContextVar("pgflow_orm_connection")
_lock = threading.Lock()
_engine: Any = None


class _Lent:
    """The step's psycopg connection as SQLAlchemy sees it: it may use it, not end it."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def commit(self) -> None:
        """The step's transaction commits with its checkpoint, not here."""

    def rollback(self) -> None:
        """Not here either: an error left in the transaction fails the step, which rolls it back."""

    def close(self) -> None:
        """The connection is the worker's."""


def _shared_engine() -> Any:
    """One engine a process; each connection it makes is the current step's (no pool)."""
    global _engine
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    with _lock:
        if _engine is None:
            # (no hstore lookup: it needs the psycopg class itself, not a stand-in)
            _engine = create_engine("postgresql+psycopg://", poolclass=NullPool,
                                    use_native_hstore=False,
                                    creator=lambda: _Lent(_lent.get()))
        return _engine


@contextlib.contextmanager
def session(conn: Any, **options: Any) -> Iterator[Any]:
    """A ``sqlalchemy.orm.Session`` on ``conn`` (a transactional step's connection)."""
    import psycopg
    from sqlalchemy.orm import Session

    if not isinstance(conn, psycopg.Connection):
        raise TypeError(f"pgflow.orm.session takes a transactional step's psycopg Connection, "
                        f"not {type(conn).__name__}")
    token = _lent.set(conn)
    try:
        with Session(bind=_shared_engine(), **options) as orm_session:
            yield orm_session
            orm_session.flush()
    finally:
        _lent.reset(token)
