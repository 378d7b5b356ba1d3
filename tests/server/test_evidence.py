"""Evidence (signing.py, evidence.py, `p402 export` / `p402 verify`): signed reports
are ATTESTED and bad ones leave nothing in the ledger; tampering with the ledger or
with an export is caught and named."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import time

import grpc
import pytest
import sqlalchemy as sa

from p402_server import cli
from p402_server.privacy.signing import signature_metadata
from tests.server.service_harness import (admin_pb2, common_pb2, error_info, meter_pb2,
                                          owners, svc)  # noqa: F401

MODEL = "gpt-4o-mini"
M = common_pb2


def _record(i: int, mode=M.PRIVACY_MODE_PRIVATE_GATEWAY) -> meter_pb2.RecordRequest:
    return meter_pb2.RecordRequest(
        event_id=f"evt-{i}", model=MODEL, owners=owners(customer="acme", feature=f"f{i}"),
        labels={"b": "2", "a": "1"}, usage=M.Usage(input_tokens=100 + i, output_tokens=7),
        privacy_mode=mode)


async def _gateway(svc) -> tuple[str, str]:
    r = await svc.admin.RegisterGateway(admin_pb2.RegisterGatewayRequest(name="edge"),
                                        metadata=svc.auth)
    assert len(r.secret) == 64 and r.gateway.gateway_id.startswith("gw_")
    return r.gateway.gateway_id, r.secret


async def _ledger_ids(svc) -> list[str]:
    await svc.server.writer.flush()
    events = (await svc.meter.Query(meter_pb2.QueryRequest(), metadata=svc.auth)).events
    return sorted(e.event_id for e in events)


async def test_signed_report_is_attested(svc):
    gid, secret = await _gateway(svc)
    req = _record(1)
    md = svc.auth + signature_metadata(gid, secret, "Record", req)
    r = await svc.meter.Record(req, metadata=md)
    assert r.evidence == M.EVIDENCE_ATTESTED
    listed = await svc.admin.ListGateways(admin_pb2.ListGatewaysRequest(), metadata=svc.auth)
    assert [g.gateway_id for g in listed.gateways] == [gid]
    assert secret not in str(listed)
    # A signed batch too.
    batch = meter_pb2.RecordBatchRequest(records=[_record(2), _record(3)])
    md = svc.auth + signature_metadata(gid, secret, "RecordBatch", batch)
    resp = await svc.meter.RecordBatch(batch, metadata=md)
    assert [x.evidence for x in resp.results] == [M.EVIDENCE_ATTESTED] * 2


@pytest.mark.parametrize("case", ["unsigned", "bad_signature", "other_body", "stale",
                                  "replayed", "unknown_gateway", "revoked"])
async def test_bad_reports_are_rejected_and_leave_nothing(svc, case):
    gid, secret = await _gateway(svc)
    req = _record(1)
    expected = {"unsigned": "SIGNATURE_MISSING", "bad_signature": "SIGNATURE_INVALID",
                "other_body": "SIGNATURE_INVALID", "stale": "SIGNATURE_STALE",
                "replayed": "NONCE_REPLAYED", "unknown_gateway": "GATEWAY_UNKNOWN",
                "revoked": "GATEWAY_UNKNOWN"}[case]
    md = signature_metadata(gid, secret, "Record", req)
    before = []
    if case == "unsigned":
        md = ()
    elif case == "bad_signature":
        md = signature_metadata(gid, "00" * 32, "Record", req)
    elif case == "other_body":
        md = signature_metadata(gid, secret, "Record", _record(2))
    elif case == "stale":
        md = signature_metadata(gid, secret, "Record", req,
                                timestamp=int(time.time()) - 301)
    elif case == "replayed":
        first = await svc.meter.Record(req, metadata=svc.auth + md)
        assert first.evidence == M.EVIDENCE_ATTESTED
        before = [first.event_id]
        req = _record(2)  # a new report cannot reuse the nonce either
        md = tuple((k, v) for k, v in md if k != "x-p402-signature") + (
            ("x-p402-signature", signature_metadata(
                gid, secret, "Record", req, nonce=dict(md)["x-p402-nonce"],
                timestamp=int(dict(md)["x-p402-timestamp"]))[3][1]),)
    elif case == "unknown_gateway":
        md = signature_metadata("gw_nobody", secret, "Record", req)
    elif case == "revoked":
        await svc.admin.RevokeGateway(admin_pb2.RevokeGatewayRequest(gateway_id=gid),
                                      metadata=svc.auth)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.meter.Record(req, metadata=svc.auth + tuple(md))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(err.value).reason == expected
    assert await _ledger_ids(svc) == before


async def test_unsigned_stream_of_private_gateway_is_refused(svc):
    async def gen():
        yield _record(1)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in svc.meter.StreamRecords(gen(), metadata=svc.auth):
            pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await _ledger_ids(svc) == []


# --- the chain, from the database and from export files ---------------------------------

async def _fill(svc, n=5) -> None:
    for i in range(n):
        await svc.meter.Record(_record(i, M.PRIVACY_MODE_METADATA_ONLY), metadata=svc.auth)
    await svc.server.writer.flush()


async def _export(svc, tmp_path, fmt: str, name: str) -> str:
    path = str(tmp_path / name)
    code = await asyncio.to_thread(cli.main, [
        "export", "--format", fmt, "--output", path, "--target", f"127.0.0.1:{svc.port}",
        "--api-key", svc.api_key])
    assert code == 0
    return path


async def _verify_file(path: str, *extra: str) -> int:
    return await asyncio.to_thread(cli.main, ["verify", "--file", path, *extra])


def _rows(path: str, fmt: str):
    with open(path, encoding="utf-8", newline="") as fh:
        text = fh.read()
    if fmt == "jsonl":
        lines = text.splitlines()
        return lines[:-1], lines[-1]
    return text, None


def _write(path: str, fmt: str, rows, digest_line) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        if fmt == "jsonl":
            fh.write("\n".join([*rows, digest_line]) + "\n")
        else:
            fh.write(rows)


def _tamper_csv(text: str, how: str) -> str:
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    if how == "modify":
        rows[2]["cost_nanos"] = str(int(rows[2]["cost_nanos"]) - 1)
    elif how == "delete":
        del rows[2]
    elif how == "insert":
        rows.insert(2, dict(rows[1]))
    elif how == "reorder":
        rows[1], rows[2] = rows[2], rows[1]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=reader.fieldnames)
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


def _tamper_jsonl(rows: list[str], how: str) -> list[str]:
    rows = list(rows)
    if how == "modify":
        d = json.loads(rows[2])
        d["usage"]["input_tokens"] += 1
        rows[2] = json.dumps(d)
    elif how == "delete":
        del rows[2]
    elif how == "insert":
        rows.insert(2, rows[1])
    elif how == "reorder":
        rows[1], rows[2] = rows[2], rows[1]
    return rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "focus"])
async def test_export_verifies_and_tampering_is_caught(svc, tmp_path, fmt):
    await _fill(svc)
    path = await _export(svc, tmp_path, fmt, f"events.{fmt}")
    assert await _verify_file(path) == 0
    pub = (await svc.admin.GetSettings(admin_pb2.GetSettingsRequest(),
                                       metadata=svc.auth)).evidence_public_key
    assert await _verify_file(path, "--public-key", pub) == 0
    assert await _verify_file(path, "--public-key", "ab" * 32) == 1
    rows, digest_line = _rows(path, fmt)
    for how in ("modify", "delete", "insert", "reorder"):
        bad = str(tmp_path / f"{how}.{fmt}")
        if fmt == "jsonl":
            _write(bad, fmt, _tamper_jsonl(rows, how), digest_line)
        elif fmt == "csv":
            _write(bad, fmt, _tamper_csv(rows, how), None)
            with open(path + ".digest.json") as src, open(bad + ".digest.json", "w") as dst:
                dst.write(src.read())
        else:
            continue  # FOCUS: verified intact above; tampering is the CSV case's
        assert await _verify_file(bad) == 1, how


async def test_bad_digest_signature_is_caught(svc, tmp_path, capsys):
    await _fill(svc, 3)
    path = await _export(svc, tmp_path, "jsonl", "events.jsonl")
    rows, digest_line = _rows(path, "jsonl")
    d = json.loads(digest_line)
    d["digest"]["until_ms"] = 1  # altered after signing
    _write(path, "jsonl", rows, json.dumps(d))
    assert await _verify_file(path, "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert "signature" in out["reason"]
    # No digest at all: not a complete signed export.
    _write(path, "jsonl", rows[:], json.dumps(json.loads(rows[-1])))
    assert await _verify_file(path) == 1
    assert await _verify_file(str(tmp_path / "missing.jsonl")) == 2


@pytest.mark.parametrize("how", ["modify", "delete", "insert", "reorder"])
async def test_tampered_database_is_caught_by_verify(svc, capsys, how):
    await _fill(svc)
    url = svc.url
    await svc.close()
    svc.close = _noop
    from p402_server.ledger import open_store, schema

    store = await open_store(url)
    ev = schema.events
    async with store.engine.begin() as conn:
        rows = (await conn.execute(sa.select(ev).order_by(ev.c.chain_index))).mappings().all()
        third = rows[2]
        if how == "modify":
            await conn.execute(ev.update().where(ev.c.seq == third["seq"])
                               .values(cost_nanos=third["cost_nanos"] + 1))
        elif how == "delete":
            await conn.execute(ev.delete().where(ev.c.seq == third["seq"]))
        elif how == "insert":
            values = {k: v for k, v in dict(rows[1]).items() if k != "seq"}
            values.update(event_id="forged", chain_index=None)
            await conn.execute(ev.insert().values(**values))
        else:  # swap the positions of two events
            a, b = rows[1], rows[2]
            await conn.execute(ev.update().where(ev.c.seq == a["seq"]).values(chain_index=-1))
            await conn.execute(ev.update().where(ev.c.seq == b["seq"])
                               .values(chain_index=a["chain_index"]))
            await conn.execute(ev.update().where(ev.c.seq == a["seq"])
                               .values(chain_index=b["chain_index"]))
    await store.close()
    code = await asyncio.to_thread(cli.main, ["verify", "--db", url, "--json"])
    assert code == 1
    out = json.loads(capsys.readouterr().out)
    assert out[0]["ok"] is False and out[0]["reason"]
    # The forged row has no chain position: named after the chain's last one.
    assert out[0]["first_bad_index"] == {"insert": 6, "reorder": 2}.get(how, 3)


async def test_intact_database_verifies(svc, capsys):
    await _fill(svc)
    await svc.server.writer.flush()
    code = await asyncio.to_thread(cli.main, ["verify", "--db", svc.url, "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["ok"] and out[0]["count"] == 5


async def _noop():
    return None
