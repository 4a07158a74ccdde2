import uuid

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from aioqueue.contrib.django import send_on_commit
from orders.models import Order
from orders.tasks import confirm


class PaymentDeclined(Exception):
    pass


@csrf_exempt  # an API example; keep CSRF on for forms
@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    task_id = uuid.uuid4().hex  # known before the send, so the row can keep it
    try:
        with transaction.atomic():
            order = Order.objects.create(item=request.POST["item"], confirm_task_id=task_id)
            send_on_commit(confirm.s(order.id).set(task_id=task_id))
            if request.GET.get("fail"):
                raise PaymentDeclined
    except PaymentDeclined:  # rolled back: no order, and the confirmation is never sent
        return JsonResponse({"error": "payment declined", "task_id": task_id}, status=402)
    return JsonResponse({"order_id": order.id, "task_id": task_id}, status=201)


@require_GET
def order_detail(request: HttpRequest, order_id: int) -> JsonResponse:
    order = get_object_or_404(Order, id=order_id)
    return JsonResponse({"id": order.id, "item": order.item, "status": order.status})
