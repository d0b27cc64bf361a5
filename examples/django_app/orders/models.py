from django.db import models


class Order(models.Model):
    """An order; its fulfilment is the pgflow run ``run_id`` (workflow ``fulfil_order``)."""

    STATUSES = [("new", "new"), ("paid", "paid"), ("shipped", "shipped")]

    item = models.CharField(max_length=200)
    quantity = models.PositiveIntegerField()
    status = models.CharField(max_length=20, choices=STATUSES, default="new")
    run_id = models.UUIDField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)
