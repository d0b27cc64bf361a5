import pgflow
from tests.support.workflows.deploy.steps import where_am_i


@pgflow.workflow(name="versioned", version="2")
def versioned(ctx: pgflow.Context) -> int:
    return where_am_i(str(ctx.workflow_id), "2")
