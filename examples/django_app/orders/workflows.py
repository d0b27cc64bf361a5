"""The order's fulfilment, run by ``pgflow worker orders.workflows``.

Both steps are transactional: each gets the worker's connection inside the
transaction that records the step as done, so an order is marked paid (then
shipped) exactly once, however the worker dies. They use SQL on that
connection, not the ORM, so the worker needs no Django setup. A step that uses
the ORM instead would need ``django.setup()`` at the top of this module (with
``DJANGO_SETTINGS_MODULE`` set), and its writes would be its own transaction,
not the step's.
"""

from __future__ import annotations

from typing import Any

import psycopg

import pgflow


@pgflow.step(transactional=True)
def mark_paid(conn: psycopg.Connection[Any], order_id: int) -> str:
    row = conn.execute("update orders_order set status = 'paid'"
                       " where id = %s and status = 'new' returning status", (order_id,)).fetchone()
    if row is None:
        raise LookupError(f"order {order_id} is not new")
    return row[0]


@pgflow.step(transactional=True)
def mark_shipped(conn: psycopg.Connection[Any], order_id: int) -> str:
    row = conn.execute("update orders_order set status = 'shipped'"
                       " where id = %s and status = 'paid' returning status",
                       (order_id,)).fetchone()
    if row is None:
        raise LookupError(f"order {order_id} is not paid")
    return row[0]


@pgflow.workflow(name="fulfil_order")
def fulfil_order(ctx: pgflow.Context, order_id: int) -> str:
    mark_paid(order_id)
    return mark_shipped(order_id)
