"""The JSON codec, without a database: typed values go out as JSON and come back typed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid
from decimal import Decimal

import pydantic
import pytest

from pgflow import codec, errors


class Order(pydantic.BaseModel):
    id: uuid.UUID
    total: Decimal
    placed: dt.datetime


@dataclasses.dataclass
class Receipt:
    order_id: uuid.UUID
    charged: Decimal


def charge(order: Order, at: dt.datetime, *, note: str = "") -> Receipt: ...


ORDER = Order(id=uuid.uuid4(), total=Decimal("42.10"),
              placed=dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.timezone.utc))


def test_arguments_round_trip_through_json_with_their_types():
    signature = codec.Signature(charge)
    at = dt.datetime(2026, 12, 2, 10, 0, tzinfo=dt.timezone.utc)
    stored = signature.encode_args((ORDER, at), {}, "charge")
    assert isinstance(stored, list) and isinstance(stored[0], dict)   # plain JSON
    args, kwargs = signature.decode_args(stored, "charge")
    assert args == [ORDER, at] and kwargs == {}
    named = signature.encode_args((), {"order": ORDER, "at": at, "note": "n"}, "charge")
    assert signature.decode_args(named, "charge") == ([ORDER, at], {"note": "n"})


def test_a_result_comes_back_as_its_declared_type():
    signature = codec.Signature(charge)
    receipt = Receipt(ORDER.id, Decimal("84.20"))
    assert signature.decode_result(codec.to_json(receipt, "result"), "result") == receipt


def test_arguments_that_do_not_fit_the_signature_are_refused_before_encoding():
    with pytest.raises(TypeError, match="charge"):
        codec.Signature(charge).encode_args((ORDER,), {}, "charge")   # `at` missing


@pytest.mark.parametrize("value", [object(), math.nan, math.inf])
def test_a_value_json_cannot_hold_is_an_encoding_error(value):
    with pytest.raises(errors.EncodingError):
        codec.dumps([value], "the input")


def test_workers_announce_parameters_as_start_checks_them():
    assert codec.Signature(charge).describe() == [
        {"name": "order", "kind": "positional", "required": True},
        {"name": "at", "kind": "positional", "required": True},
        {"name": "note", "kind": "keyword_only", "required": False},
    ]
