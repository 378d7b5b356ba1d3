"""Privacy modes at the service (privacy.py): content never reaches the database or
the logs under metadata_only and fingerprint_only; fingerprints, duplicates,
redacted content and the full_trace opt-in behave as documented."""
from __future__ import annotations

import glob
import logging

import grpc
import pytest

from tests.server.service_harness import (admin_pb2, common_pb2, error_info, meter_pb2, nanos,
                                          owners, svc)  # noqa: F401

MODEL = "gpt-4o-mini"
PROMPT = "zebra-quartz-7731 the secret launch codes of Project Nightingale"
RESPONSE = "okapi-vellum-4402 the launch codes are in the blue binder"
M = common_pb2


async def _settings(svc, **fields):
    await svc.admin.UpdateSettings(admin_pb2.UpdateSettingsRequest(
        settings=admin_pb2.Settings(**fields), update_mask=list(fields)), metadata=svc.auth)


async def _call(svc, mode, prompt=PROMPT, response=RESPONSE, customer="acme", event_id=""):
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer=customer), content=prompt,
        max_output_tokens=100, privacy_mode=mode), metadata=svc.auth)
    assert a.decision == M.DECISION_ALLOW, a
    return await svc.meter.Record(meter_pb2.RecordRequest(
        event_id=event_id, reservation_id=a.reservation_id,
        usage=M.Usage(input_tokens=20, output_tokens=15), prompt=prompt,
        response=response, privacy_mode=mode), metadata=svc.auth)


@pytest.mark.parametrize("mode", [M.PRIVACY_MODE_METADATA_ONLY,
                                  M.PRIVACY_MODE_FINGERPRINT_ONLY])
async def test_content_never_reaches_disk_or_logs(svc, mode, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    r = await _call(svc, mode)
    expected = (M.EVIDENCE_REPORTED if mode == M.PRIVACY_MODE_METADATA_ONLY
                else M.EVIDENCE_FINGERPRINTED)
    assert r.evidence == expected
    # A bad request carrying the text too (its error path logs at DEBUG).
    with pytest.raises(grpc.aio.AioRpcError):
        await svc.meter.Record(meter_pb2.RecordRequest(
            model=MODEL, owners=owners(customer="acme"), prompt=PROMPT,
            response=RESPONSE, usage=M.Usage(input_tokens=-1)), metadata=svc.auth)
    events = (await svc.meter.Query(meter_pb2.QueryRequest(), metadata=svc.auth)).events
    ev = next(e for e in events if e.event_id == r.event_id)
    if mode == M.PRIVACY_MODE_FINGERPRINT_ONLY:
        assert len(ev.prompt_fingerprint) == 32 and len(ev.response_fingerprint) == 32
    else:
        assert not ev.prompt_fingerprint and not ev.response_fingerprint
    await svc.close()  # flushes the writer; the files are complete now
    svc.close = _noop  # the fixture's close must not run twice
    files = glob.glob(str(tmp_path / "p402.db*"))
    assert any(f.endswith("p402.db") for f in files)
    for needle in (PROMPT, RESPONSE, "zebra-quartz-7731", "okapi-vellum-4402"):
        raw = needle.encode()
        for f in files:
            with open(f, "rb") as fh:
                assert raw not in fh.read(), f"{needle!r} found in {f}"
        assert needle not in caplog.text


async def _noop():
    return None


async def test_full_trace_refused_unless_allowed(svc):
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), content=PROMPT,
        privacy_mode=M.PRIVACY_MODE_FULL_TRACE), metadata=svc.auth)
    assert a.decision == M.DECISION_DENY
    assert "policy.privacy_mode_not_allowed" in a.reasons and not a.reservation_id
    # A Record reports a call already made and paid for: it is metered, keeping
    # nothing of its content, and says why (its answer and its event).
    meter_only = await svc.meter.Record(meter_pb2.RecordRequest(
        model=MODEL, owners=owners(customer="acme"), prompt=PROMPT, response=RESPONSE,
        usage=M.Usage(input_tokens=5, output_tokens=5),
        privacy_mode=M.PRIVACY_MODE_FULL_TRACE), metadata=svc.auth)
    assert list(meter_only.reasons) == ["policy.privacy_mode_not_allowed"]
    assert nanos(meter_only.cost) > 0
    # The same for a reservation made under an allowed mode: its hold is settled at
    # the call's cost, not left to expire at its estimate.
    held = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), content=PROMPT, max_output_tokens=100,
        privacy_mode=M.PRIVACY_MODE_FINGERPRINT_ONLY), metadata=svc.auth)
    assert held.decision == M.DECISION_ALLOW
    reserved = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=held.reservation_id, prompt=PROMPT, response=RESPONSE,
        usage=M.Usage(input_tokens=20, output_tokens=15),
        privacy_mode=M.PRIVACY_MODE_FULL_TRACE), metadata=svc.auth)
    assert list(reserved.reasons) == ["policy.privacy_mode_not_allowed"]
    assert 0 < nanos(reserved.cost) < nanos(reserved.estimated_cost)
    await svc.server.writer.flush()
    events = {e.event_id: e for e in (await svc.meter.Query(
        meter_pb2.QueryRequest(), metadata=svc.auth)).events}
    assert sorted(e.kind for e in events.values()) == ["denied", "record", "record"]
    for r in (meter_only, reserved):
        ev = events[r.event_id]
        assert ev.privacy_mode == M.PRIVACY_MODE_METADATA_ONLY
        assert list(ev.reasons) == ["policy.privacy_mode_not_allowed"]
        assert not ev.prompt_fingerprint and not ev.response_fingerprint
        assert await svc.store.get_contents(svc.tenant_id, r.event_id) == []
    assert events[reserved.event_id].reservation_id == held.reservation_id
    # A retry is the same event, answered with the same reason.
    again = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=held.reservation_id, usage=M.Usage(input_tokens=20, output_tokens=15),
        privacy_mode=M.PRIVACY_MODE_FULL_TRACE), metadata=svc.auth)
    assert again.duplicate and again.event_id == reserved.event_id
    assert list(again.reasons) == ["policy.privacy_mode_not_allowed"]
    # Explicitly allowed: the content is kept verbatim in its own table.
    await _settings(svc, allowed_privacy_modes=[1, 2, 3, 4, 5])
    r = await _call(svc, M.PRIVACY_MODE_FULL_TRACE)
    kept = await svc.store.get_contents(svc.tenant_id, r.event_id)
    assert {c.kind: c.text for c in kept} == {"prompt": PROMPT, "response": RESPONSE}
    assert all(c.expires_ms > 0 for c in kept)


async def test_privacy_rule_allows_full_trace(svc):
    await svc.admin.PutPolicyRule(admin_pb2.PutPolicyRuleRequest(rule=admin_pb2.PolicyRule(
        rule_id="trace-ok", effect=admin_pb2.EFFECT_PRIVACY,
        allowed_privacy_modes=[1, 2, 3, 5])), metadata=svc.auth)
    r = await _call(svc, M.PRIVACY_MODE_FULL_TRACE)
    assert r.evidence == M.EVIDENCE_FINGERPRINTED


async def test_redacted_trace_keeps_only_redacted_allowed_fields(svc):
    await _settings(svc, redacted_trace_fields=["prompt"])
    prompt = "mail jane@example.com, key sk-abcdefghijklmnopqrstuvwxyz0123 please"
    r = await _call(svc, M.PRIVACY_MODE_REDACTED_TRACE, prompt=prompt)
    kept = await svc.store.get_contents(svc.tenant_id, r.event_id)
    assert [(c.kind, c.text) for c in kept] == [
        ("prompt", "mail [EMAIL], key [OPENAI_KEY] please")]


async def test_same_prompt_same_owner_is_a_duplicate(svc):
    first = await _call(svc, M.PRIVACY_MODE_FINGERPRINT_ONLY)
    again = await _call(svc, M.PRIVACY_MODE_FINGERPRINT_ONLY, response="other")
    other_owner = await _call(svc, M.PRIVACY_MODE_FINGERPRINT_ONLY, customer="globex")
    other_prompt = await _call(svc, M.PRIVACY_MODE_FINGERPRINT_ONLY, prompt="different")
    events = {e.event_id: e for e in (await svc.meter.Query(
        meter_pb2.QueryRequest(), metadata=svc.auth)).events}
    assert events[again.event_id].duplicate_of == first.event_id
    assert events[first.event_id].duplicate_of == ""
    assert events[other_owner.event_id].duplicate_of == ""
    assert events[other_prompt.event_id].duplicate_of == ""
    # Fingerprints are salted per tenant: another tenant's differ for the same text.
    assert events[again.event_id].prompt_fingerprint == events[first.event_id].prompt_fingerprint


async def test_secrets_never_in_settings(svc):
    s = await svc.admin.GetSettings(admin_pb2.GetSettingsRequest(), metadata=svc.auth)
    assert len(s.evidence_public_key) == 64
    stored = await svc.store.get_settings(svc.tenant_id)
    salt = stored["secrets"]["fingerprint_salt"]
    assert salt.split(":", 1)[1] not in str(s)


async def test_settings_validation(svc):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _settings(svc, redacted_trace_fields=["body"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).metadata["field"] == "settings.redacted_trace_fields"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _settings(svc, default_privacy_mode=M.PRIVACY_MODE_FULL_TRACE)
    assert error_info(err.value).metadata["field"] == "settings.default_privacy_mode"


async def test_kept_content_leaves_memory_once_stored(svc):
    """The idempotency memory keeps a Record's event to answer retries; the text the
    mode keeps lives in the contents table once committed, not in that memory (else
    a tenant keeping traces would hold up to recent_ids of them, 64 MiB each)."""
    await _settings(svc, allowed_privacy_modes=[1, 2, 3, 4, 5])
    r = await _call(svc, M.PRIVACY_MODE_FULL_TRACE, event_id="evt_kept")
    remembered = svc.server.runtime.tenants[svc.tenant_id]._events.get("evt_kept")
    assert remembered is not None and remembered.seq  # committed
    assert remembered.contents == ()
    kept = await svc.store.get_contents(svc.tenant_id, "evt_kept")
    assert {c.kind: c.text for c in kept} == {"prompt": PROMPT, "response": RESPONSE}
    again = await svc.meter.Record(meter_pb2.RecordRequest(  # a retry, without its hold
        event_id="evt_kept", model=MODEL, usage=M.Usage(input_tokens=20, output_tokens=15),
        prompt=PROMPT, response=RESPONSE, privacy_mode=M.PRIVACY_MODE_FULL_TRACE),
        metadata=svc.auth)
    assert again.duplicate and again.event_id == r.event_id
    assert len(await svc.store.get_contents(svc.tenant_id, "evt_kept")) == 2


async def test_prompts_held_for_records_stay_within_their_budget(tmp_path):
    """An open hold keeps its Authorize's prompt for the Record where the mode keeps
    text, within held_prompts_mib per tenant: past it the hold keeps the fingerprint
    alone, the Record is metered all the same, and nothing stays held after it."""
    import sys

    from tests.server.service_harness import start_service

    svc = await start_service(f"sqlite+aiosqlite:///{tmp_path}/l.db",
                              held_prompts_mib=0.01)  # 10 KiB
    try:
        await _settings(svc, allowed_privacy_modes=[1, 2, 3, 4, 5])
        small, big = "p" * 2000, "q" * 20000
        auths = []
        for text in (small, big):
            a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
                model=MODEL, owners=owners(customer="acme"), content=text,
                max_output_tokens=100, privacy_mode=M.PRIVACY_MODE_FULL_TRACE),
                metadata=svc.auth)
            assert a.decision == M.DECISION_ALLOW
            auths.append(a)
        held = svc.server.runtime.tenants[svc.tenant_id]._hold_privacy
        assert held[auths[0].reservation_id][1] == small
        fingerprint, text = held[auths[1].reservation_id]
        assert text is None and fingerprint  # too big: the fingerprint alone
        assert held.bytes == sys.getsizeof(small) and held.dropped == 1
        kept = []
        for a in auths:  # Records that do not send the prompt again
            r = await svc.meter.Record(meter_pb2.RecordRequest(
                reservation_id=a.reservation_id, response=RESPONSE,
                usage=M.Usage(input_tokens=20, output_tokens=15),
                privacy_mode=M.PRIVACY_MODE_FULL_TRACE), metadata=svc.auth)
            kept.append({c.kind: c.text
                         for c in await svc.store.get_contents(svc.tenant_id, r.event_id)})
            event = await svc.store.get_event(svc.tenant_id, r.event_id)
            assert event.prompt_fingerprint and event.cost_nanos > 0
        assert kept == [{"prompt": small, "response": RESPONSE}, {"response": RESPONSE}]
        assert not held and held.bytes == 0
    finally:
        await svc.close()
