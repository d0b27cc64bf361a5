"""``POST /orders`` creates an order and starts its fulfilment in one transaction."""

from __future__ import annotations

import json

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

import pgflow
from orders import workflows
from orders.models import Order


def _bad_request(message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=400)


@csrf_exempt
@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    """Body ``{"item": "book", "quantity": 2}``; answers ``{"id": ..., "run_id": ...}``."""
    try:
        body = json.loads(request.body or b"null")
    except ValueError:
        return _bad_request("the body must be JSON")
    if not isinstance(body, dict):
        return _bad_request('the body must be a JSON object: {"item": ..., "quantity": ...}')
    item, quantity = body.get("item"), body.get("quantity")
    if not isinstance(item, str) or not item.strip() or len(item) > 200:
        return _bad_request("item must be a non-empty string of at most 200 characters")
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1:
        return _bad_request("quantity must be a positive integer")

    # The order and its run commit together: if anything here fails, neither exists,
    # and a worker never sees a run for an order that was never saved.
    with transaction.atomic():
        order = Order.objects.create(item=item.strip(), quantity=quantity)
        order.run_id = pgflow.start(connection, workflows.fulfil_order, order.id,
                                    key=f"order:{order.id}")
        order.save(update_fields=["run_id"])
    return JsonResponse({"id": order.id, "run_id": str(order.run_id)}, status=201)


@require_GET
def show_order(request: HttpRequest, order_id: int) -> JsonResponse:
    order = Order.objects.filter(id=order_id).first()
    if order is None:
        return JsonResponse({"error": f"no order {order_id}"}, status=404)
    run = pgflow.get(connection, order.run_id)
    return JsonResponse({"id": order.id, "item": order.item, "quantity": order.quantity,
                         "status": order.status, "run_status": run.status})
