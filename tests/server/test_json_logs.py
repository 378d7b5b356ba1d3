"""`--log-format json`: one JSON object per line, carrying the id of the request it
was logged under (the caller's x-request-id, else a new one)."""
from __future__ import annotations

import io
import json
import logging

import grpc
import pytest
from p402.v1 import common_pb2, meter_pb2

from p402_server.observe import logs
from tests.server.service_harness import svc  # noqa: F401


async def test_lines_are_json_with_the_request_id(svc, monkeypatch):
    monkeypatch.setattr(logs, "enabled", True)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("p402")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await svc.meter.Record(meter_pb2.RecordRequest(
                model="gpt-4o-mini", owners=common_pb2.Owners(customer="acme"),
                usage=common_pb2.Usage(input_tokens=-1)),
                metadata=(*svc.auth, ("x-request-id", "req-from-caller-42")))
        with pytest.raises(grpc.aio.AioRpcError):
            await svc.meter.Record(meter_pb2.RecordRequest(
                model="gpt-4o-mini", owners=common_pb2.Owners(customer="acme"),
                usage=common_pb2.Usage(input_tokens=-2)), metadata=svc.auth)
        # a streaming call's lines carry its request id too
        call = svc.meter.StreamRecords(metadata=(*svc.auth, ("x-request-id", "req-stream-7")))
        await call.write(meter_pb2.RecordRequest(
            model="gpt-4o-mini", owners=common_pb2.Owners(customer="acme"),
            usage=common_pb2.Usage(input_tokens=-3)))
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in call:
                pass
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    mine = [x for x in lines if x.get("request_id") == "req-from-caller-42"]
    refused = [x for x in mine if "INVALID_ARGUMENT" in x["message"]]
    assert refused and refused[0]["level"] == "DEBUG"
    assert set(refused[0]) >= {"time", "level", "logger", "message", "request_id"}
    streamed = [x for x in lines if x.get("request_id") == "req-stream-7"]
    assert any("INVALID_ARGUMENT" in x["message"] for x in streamed)
    others = [x for x in lines if x.get("request_id", "").startswith("req_")]
    assert others  # no x-request-id: a new one


def test_configure_refuses_unknown_formats_and_text_keeps_ids_off():
    with pytest.raises(ValueError):
        logs.configure("INFO", "xml")
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure("INFO", "text")
        assert logs.enabled is False
        logs.configure("WARNING", "json")
        assert logs.enabled is True and isinstance(root.handlers[0].formatter,
                                                   logs.JsonFormatter)
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
        logs.enabled = False
