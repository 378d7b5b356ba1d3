"""Hold records: one open reservation as plain, self-contained data.

Shared by both engine twins (like `_rule`), so `Engine.hold_record` /
`Engine.restore_holds` accept and refuse exactly the same input with the same
errors whichever twin runs. A record is what the server writes behind to its
holds table and reads back at start:

    {"reservation_id": str, "model": str, "provider": str,
     "price": ModelPrice.to_dict(),           # the price the hold was made with
     "owners": [6 str, OWNER_KEYS order],     # or a mapping {dimension: value}
     "labels": {str: str} | None,
     "amount_nanos": int,                     # what is held on each budget
     "input_tokens": int, "output_tokens": int,   # the estimate
     "input_bytes": int,                      # -1: unknown (content not measured)
     "expires_ms": int,                       # Unix ms
     "budget_ids": [str],                     # the budgets it holds on
     "catalog_version": str}

Every key is required except `labels` (None) and `catalog_version` ("");
unknown keys are refused, so a misspelt field never passes silently.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Callable

from ._enums import MAX_TOKENS, InvalidArgument

HOLD_RECORD_FIELDS = (
    "reservation_id", "model", "provider", "price", "owners", "labels", "amount_nanos",
    "input_tokens", "output_tokens", "input_bytes", "expires_ms", "budget_ids",
    "catalog_version",
)
_OPTIONAL = {"labels": None, "catalog_version": ""}
_KNOWN = frozenset(HOLD_RECORD_FIELDS)
MAX_NOW_MS = 2**62 - 1


def hold_record(reservation_id: str, model: str, provider: str, price: Any, owners: tuple,
                labels: dict | None, amount: int, input_tokens: int, output_tokens: int,
                input_bytes: int, expires_ms: int, budget_ids: tuple,
                catalog_version: str) -> dict:
    """The record of one hold (fresh containers: the caller may keep or mutate it)."""
    return {
        "reservation_id": reservation_id,
        "model": model,
        "provider": provider,
        "price": price.to_dict(),
        "owners": list(owners),
        "labels": dict(labels) if labels else None,
        "amount_nanos": amount,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_bytes": input_bytes,
        "expires_ms": expires_ms,
        "budget_ids": list(budget_ids),
        "catalog_version": catalog_version,
    }


class RecordParser:
    """Validates records into plain tuples for one `restore_holds` call.

    The twin passes its own checkers (same checks and messages in both) and
    its ModelPrice class; equal price dicts become one ModelPrice object (the
    catalog's own when it prices the model identically), so a million
    restored holds do not carry a million copies of a handful of prices.
    """

    def __init__(self, *, model_price: Any, catalog: Any, check_int: Callable,
                 check_str: Callable, owners_tuple: Callable, labels_dict: Callable,
                 max_nanos: int):
        self._model_price = model_price
        self._catalog = catalog
        self._check_int = check_int
        self._check_str = check_str
        self._owners = owners_tuple
        self._labels = labels_dict
        self._max_amount = max_nanos + 1
        self._prices: dict[str, Any] = {}

    def _price(self, d: Any, model: str, provider: str) -> Any:
        if not isinstance(d, Mapping):
            raise InvalidArgument("price", f"must be a ModelPrice dict, not {type(d).__name__}")
        try:
            key = json.dumps(d, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError):
            raise InvalidArgument("price", "must be a ModelPrice dict of plain values") from None
        price = self._prices.get(key)
        if price is None:
            try:
                price = self._model_price.from_dict(d)
            except InvalidArgument as e:
                raise InvalidArgument(f"price.{e.field}", e.message) from None
            try:
                known = self._catalog.lookup(price.model, price.provider)
            except LookupError:
                known = None
            if known is not None and known.to_dict() == price.to_dict():
                price = known
            self._prices[key] = price
        return price

    def parse(self, index: int, d: Any) -> tuple:
        """(reservation_id, model, provider, price, owners, labels, amount_nanos,
        input_tokens, output_tokens, input_bytes, expires_ms, budget_ids,
        catalog_version) — or InvalidArgument naming `records[index].<field>`."""
        try:
            return self._parse(d)
        except InvalidArgument as e:
            raise InvalidArgument(f"records[{index}].{e.field}", e.message) from None

    def _parse(self, d: Any) -> tuple:
        if not isinstance(d, Mapping):
            raise InvalidArgument("record", f"must be a mapping, not {type(d).__name__}")
        for k in d:
            if k not in _KNOWN:
                raise InvalidArgument(str(k), "unknown hold record field")
        for k in HOLD_RECORD_FIELDS:
            if k not in d and k not in _OPTIONAL:
                raise InvalidArgument(k, "is required")
        ci, cs = self._check_int, self._check_str
        rid = cs("reservation_id", d["reservation_id"], True)
        model = cs("model", d["model"], True)
        provider = cs("provider", d["provider"], False)
        price = self._price(d["price"], model, provider)
        owners = d["owners"]
        if isinstance(owners, list):
            owners = tuple(owners)
        owners = self._owners(owners, "owners")
        labels = self._labels(d.get("labels"), "labels")
        amount = ci("amount_nanos", d["amount_nanos"], 0, self._max_amount)
        input_tokens = ci("input_tokens", d["input_tokens"], 0, MAX_TOKENS)
        output_tokens = ci("output_tokens", d["output_tokens"], 0, MAX_TOKENS)
        input_bytes = ci("input_bytes", d["input_bytes"], -1, MAX_TOKENS)
        expires_ms = ci("expires_ms", d["expires_ms"], 0, MAX_NOW_MS)
        ids = d["budget_ids"]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
            raise InvalidArgument("budget_ids", "must be a list of budget ids")
        budget_ids = tuple(cs("budget_ids", b, True) for b in ids)
        catalog_version = cs("catalog_version", d.get("catalog_version", ""), False)
        return (rid, model, provider, price, owners, labels, amount, input_tokens,
                output_tokens, input_bytes, expires_ms, budget_ids, catalog_version)


__all__ = ["HOLD_RECORD_FIELDS", "hold_record", "RecordParser"]
