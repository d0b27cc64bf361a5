"""Deploy 1 of "pricing"."""

from datetime import timedelta

import pgflow
from tests.support.workflows.deploy.steps import charge, old_price


@pgflow.workflow(name="pricing")
def pricing(ctx: pgflow.Context, order: str) -> str:
    cents = old_price(order)
    ctx.sleep(timedelta(hours=1))
    return charge(order, cents)
