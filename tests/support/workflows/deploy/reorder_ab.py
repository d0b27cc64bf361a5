"""Deploy 1 of "reorder": a, b, a long sleep, c."""

from datetime import timedelta

import pgflow
from tests.support.workflows.deploy.steps import step_a, step_b, step_c


@pgflow.workflow(name="reorder")
def reorder(ctx: pgflow.Context) -> str:
    run_id = str(ctx.workflow_id)
    first, second = step_a(run_id), step_b(run_id)
    ctx.sleep(timedelta(hours=1))
    return first + second + step_c(run_id)
