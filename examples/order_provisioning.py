"""Order provisioning, end to end: charge the card, create the account, send a welcome.

Run it with ``python examples/order_provisioning.py``. It uses ``PGFLOW_DSN``
(or ``DATABASE_URL``) when set, else the embedded PostgreSQL under
``./.pgflow/``; migrates the schema; inserts an order and starts its run in
one transaction; runs a worker in this process; and prints the run's step
timeline from the database.

In production the worker is its own process: ``pgflow worker examples.order_provisioning``.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgflow
from pgflow import dsn as dsn_resolution
from pgflow import schema


@pgflow.step
def charge_card(order_id: str, cents: int) -> str:
    time.sleep(0.05)  # a payment provider call
    return f"ch_{order_id[:8]}"


@pgflow.step
def create_account(customer: str) -> str:
    time.sleep(0.02)
    return f"acct_{customer}"


@pgflow.step
def send_welcome(account: str) -> bool:
    time.sleep(0.01)
    return True


@pgflow.workflow(name="provision_order")
def provision_order(ctx: pgflow.Context, order_id: str, customer: str, cents: int) -> dict:
    charge = charge_card(order_id, cents)  # checkpointed: never charged twice by a replay
    account = create_account(customer)
    send_welcome(account)
    return {"charge": charge, "account": account}


def main() -> None:
    dsn = dsn_resolution.resolve()
    schema.migrate(dsn)

    worker = pgflow.Worker(dsn, workflows=[provision_order])
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()

    order_id = str(uuid.uuid4())
    with psycopg.connect(dsn) as conn:
        conn.execute("create table if not exists public.orders"
                     " (id text primary key, customer text, cents int)")
        # The order and its run commit together, or neither exists.
        conn.execute("insert into public.orders values (%s, %s, %s)", (order_id, "ana", 4200))
        run_id = pgflow.start(conn, provision_order, order_id, "ana", 4200,
                              key=f"provision:{order_id}")
        conn.commit()

        output = pgflow.result(conn, run_id, timeout=60)
        run = pgflow.get(conn, run_id)

    worker.stop()
    thread.join(30)

    print(f"run {run.id}: {run.name} v{run.version} {run.status}")
    print(f"output: {output}")
    for step in run.steps:
        print(f"  #{step.seq} {step.name:<15} {step.status:<10} attempts={step.attempts}"
              f"  {step.duration_ms:7.1f} ms")
    total = (run.finished_at - run.created_at).total_seconds() * 1000
    print(f"started to finished: {total:.1f} ms")
    print(f"inspect it again with: {_cli_command()} show {run.id}")


def _cli_command() -> str:
    """How to call the ``pgflow`` command installed beside this Python, as typed from here.

    After ``make example`` that is ``.venv/bin/pgflow``: the virtualenv is not on PATH.
    """
    script = Path(sys.executable).with_name("pgflow")
    if not script.exists():
        return f"{sys.executable} -m pgflow"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


if __name__ == "__main__":
    try:
        main()
    except pgflow.PgflowError as exc:  # no database, an old ./.pgflow/, ...: say it in one line
        sys.exit(f"pgflow: error: {exc}")
