"""Opaque page tokens for ListAdapters (keyset pagination on ``(adapter_id, version)``).

A token is base64url JSON of the last row returned and a hash of the filter it was made for;
a token used with another filter, or not made by us, is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json

from loraserve.errors import InvalidArgument
from registry_svc.store import AdapterQuery


def _filter_hash(query: AdapterQuery) -> str:
    raw = json.dumps(
        [
            query.base_model,
            sorted(query.statuses),
            sorted(set(query.tags)),
            query.domain,
            query.adapter_id_prefix,
            query.include_deleted,
        ]
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def encode_token(query: AdapterQuery, adapter_id: str, version: int) -> str:
    raw = json.dumps({"a": adapter_id, "v": version, "f": _filter_hash(query)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(query: AdapterQuery, token: str) -> tuple[str, int] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after = (str(data["a"]), int(data["v"]))
        same_filter = data["f"] == _filter_hash(query)
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument.field("page_token", "is not a token of this API") from None
    if not same_filter:
        raise InvalidArgument.field("page_token", "was made for another filter")
    return after
