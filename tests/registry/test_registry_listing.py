"""1,000 adapter records (inserted through the store in bulk), paged through the real stub;
filters on base model, status, tags, domain, id prefix, deleted."""

from __future__ import annotations

import grpc
import pytest
from registry_helpers import R, S

from registry_svc.convert import FAILED, READY
from registry_svc.db import open_database
from registry_svc.store import NewAdapter, create_adapter, mark_deleted, transition

N = 1000


def _insert_pool(stack) -> None:
    db = open_database(stack.common)
    for i in range(N):
        row = create_adapter(
            db,
            NewAdapter(
                adapter_id=f"bulk-{i:04d}",
                version=0,
                base_model="tiny-llama" if i % 5 else "other-base",
                files=[],
                sha256="",
                size_bytes=0,
                tags=["even" if i % 2 == 0 else "odd", f"mod3-{i % 3}"],
                domain=f"d{i % 4}",
                sample_inputs=[f"prompt {i}"],
            ),
        )
        if i % 2 == 0:
            transition(db, row.pk, READY)
        elif i % 7 == 0:
            transition(db, row.pk, FAILED, reason="broken")
    # ids where a LIKE wildcard in the prefix would match too much
    for name in ("under_score", "underxscore"):
        create_adapter(db, NewAdapter(adapter_id=name, version=0, base_model="tiny-llama",
                                      files=[], sha256="", size_bytes=0))  # fmt: skip
    mark_deleted(db, "bulk-0999")


async def _all_pages(client, page_size: int, **filter_kw) -> tuple[list[tuple[str, int]], int]:
    out, token, pages = [], "", 0
    while True:
        resp = await client.registry.ListAdapters(
            R.ListAdaptersRequest(
                filter=R.AdapterFilter(**filter_kw), page_size=page_size, page_token=token
            )
        )
        pages += 1
        assert len(resp.adapters) <= page_size
        out += [(a.adapter_id, a.version) for a in resp.adapters]
        token = resp.next_page_token
        if not token:
            return out, pages


@pytest.fixture(scope="module")
def pool(stack):
    _insert_pool(stack)
    return stack


async def test_page_through_a_thousand(pool, registry):
    async with registry() as client:
        ids, pages = await _all_pages(client, 97, adapter_id_prefix="bulk-")
        assert pages == 11  # 999 live bulk records / 97
        assert ids == sorted(ids) and len(set(ids)) == len(ids) == N - 1
        first = await client.registry.ListAdapters(R.ListAdaptersRequest(page_size=10))
        assert first.total_size == N - 1 + 2
        assert len(first.adapters) == 10 and first.next_page_token
        capped = await client.registry.ListAdapters(R.ListAdaptersRequest(page_size=5000))
        assert len(capped.adapters) == 1000 and capped.next_page_token  # capped at 1000
        default = await client.registry.ListAdapters(R.ListAdaptersRequest())
        assert len(default.adapters) == 100


async def test_filters(pool, registry):
    expected = {
        "statuses READY": (dict(statuses=[S.ADAPTER_STATUS_READY]),
                           {i for i in range(N) if i % 2 == 0}),
        "statuses FAILED": (dict(statuses=[S.ADAPTER_STATUS_FAILED]),
                            {i for i in range(N) if i % 2 and i % 7 == 0 and i != 999}),
        "every tag": (dict(tags=["even", "mod3-0"]), {i for i in range(N) if i % 6 == 0}),
        "domain": (dict(domain="d1"), {i for i in range(N) if i % 4 == 1 and i != 999}),
        "base model": (dict(base_model="other-base"), {i for i in range(N) if i % 5 == 0}),
        "combined": (dict(base_model="tiny-llama", tags=["odd"], domain="d3"),
                     {i for i in range(N) if i % 5 and i % 2 and i % 4 == 3 and i != 999}),
        "deleted included": (dict(include_deleted=True, domain="d3"),
                             {i for i in range(N) if i % 4 == 3}),
        "statuses DELETED": (dict(statuses=[S.ADAPTER_STATUS_DELETED]), {999}),
    }  # fmt: skip
    async with registry() as client:
        for name, (flt, want) in expected.items():
            ids, _ = await _all_pages(client, 250, adapter_id_prefix="bulk-", **flt)
            assert ids == [(f"bulk-{i:04d}", 1) for i in sorted(want)], name
        ids, _ = await _all_pages(client, 10, adapter_id_prefix="under_")
        assert ids == [("under_score", 1)]


async def test_bad_page_tokens(pool, registry):
    async with registry() as client:
        page = await client.registry.ListAdapters(
            R.ListAdaptersRequest(filter=R.AdapterFilter(domain="d1"), page_size=5)
        )
        for token, flt in [
            ("not-a-token", R.AdapterFilter(domain="d1")),
            (page.next_page_token, R.AdapterFilter(domain="d2")),  # made for another filter
        ]:
            with pytest.raises(grpc.RpcError) as info:
                await client.registry.ListAdapters(
                    R.ListAdaptersRequest(filter=flt, page_size=5, page_token=token)
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
