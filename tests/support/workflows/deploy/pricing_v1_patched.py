"""Deploy 2 of "pricing": the same name and version, a new price behind a patch."""

from datetime import timedelta

import pgflow
from tests.support.workflows.deploy.steps import charge, new_price, old_price


@pgflow.workflow(name="pricing")
def pricing(ctx: pgflow.Context, order: str) -> str:
    if ctx.patched("new-pricing"):  # noqa: SIM108 - the documented patch pattern
        cents = new_price(order)
    else:
        cents = old_price(order)  # runs started on deploy 1 replay this branch
    ctx.sleep(timedelta(hours=1))
    return charge(order, cents)
