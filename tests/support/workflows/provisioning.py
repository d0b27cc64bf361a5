"""The 3-step order provisioning workflow used by the crash tests.

``create_account`` blocks on its first execution of a run (until the process
is killed or told to stop) so a test can interrupt the worker exactly there.
Its later executions return at once.
"""

from __future__ import annotations

import os
import time

import pgflow
from tests.support.workflows.effects import record

BLOCK_SECONDS = float(os.environ.get("PGFLOW_TEST_BLOCK_SECONDS", "60"))


@pgflow.step
def charge_card(run_id: str, cents: int) -> str:
    record(run_id, "charge_card")
    return f"ch_{cents}"


@pgflow.step
def create_account(run_id: str, customer: str) -> str:
    executions = record(run_id, "create_account")
    if executions == 1:
        time.sleep(BLOCK_SECONDS)
    return f"acct_{customer}"


@pgflow.step
def send_welcome(run_id: str, account: str) -> bool:
    record(run_id, "send_welcome")
    return True


@pgflow.workflow(name="provision_order")
def provision_order(ctx: pgflow.Context, customer: str, cents: int) -> dict[str, str]:
    run_id = str(ctx.workflow_id)
    charge = charge_card(run_id, cents)
    account = create_account(run_id, customer)
    send_welcome(run_id, account)
    return {"charge": charge, "account": account}
