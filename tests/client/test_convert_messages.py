"""The SDK's request builders (p402_client._convert) against a plain construction.

The builders set only the fields that differ from their defaults and take a short
path for a plain dict of owners; these properties check that what they build is
the message a constructor given every field builds, and that the short path for
owners answers exactly what the general path answers (the same message, or the same
error naming the same field), for generated values good and bad.
"""
from __future__ import annotations

import types

from hypothesis import given, settings
from hypothesis import strategies as st

from p402.v1 import common_pb2, meter_pb2
from p402_client import _convert as cv
from p402_client.errors import InvalidArgument
from p402_client.types import OWNER_KEYS, Outcome, PrivacyMode

# Strings a caller may send: ordinary names, empty, and the ones the contract
# refuses (control characters, NUL, a lone surrogate, over-long).
odd_text = st.one_of(
    st.sampled_from(["", "acme", "team-a", "\x00", "a\nb", "\ud800", "x" * 300, "ü"]),
    st.text(max_size=12))
names = st.text(alphabet="abcdefghij-_.0123456789", min_size=1, max_size=12)


def _outcome(r):
    """(message or None, (field, message) of the error or None)."""
    try:
        return r(), None
    except InvalidArgument as exc:
        return None, (exc.field, str(exc))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(OWNER_KEYS + ("team", "Customer")),
                       st.one_of(odd_text, st.integers(), st.none()), max_size=7))
def test_owners_short_path_answers_what_the_general_path_answers(owners):
    fast = _outcome(lambda: cv.owners_pb("owners", owners))
    # A read-only mapping is not a dict: it takes the general path.
    general = _outcome(lambda: cv.owners_pb("owners", types.MappingProxyType(owners)))
    assert fast == general


@settings(max_examples=300, deadline=None)
@given(model=names, provider=st.sampled_from(["", "openai"]),
       owners=st.dictionaries(st.sampled_from(OWNER_KEYS), names, max_size=3),
       labels=st.dictionaries(names, names, max_size=3),
       input_bytes=st.integers(-1, 1 << 40), cap=st.integers(0, 1 << 20),
       privacy=st.sampled_from([None, PrivacyMode.METADATA_ONLY, PrivacyMode.FULL_TRACE]),
       rid=st.sampled_from(["", "01J0000000000000000000000"]),
       ttl=st.integers(0, 3600), content=st.sampled_from([None, "", "hello"]),
       attempt=st.integers(0, 5), retry_of=st.sampled_from(["", "r1"]),
       request_id=st.sampled_from(["", "q1"]),
       expected=st.sampled_from([None, {"images": 2}]))
def test_authorize_request_is_the_message_of_every_field(
        model, provider, owners, labels, input_bytes, cap, privacy, rid, ttl, content,
        attempt, retry_of, request_id, expected):
    built = cv.authorize_request(
        model, provider=provider, owners=owners, labels=labels, input_bytes=input_bytes,
        max_output_tokens=cap, privacy_mode=privacy, reservation_id=rid, ttl_seconds=ttl,
        content=content, attempt=attempt, retry_of=retry_of, request_id=request_id,
        expected_usage=expected)
    plain = meter_pb2.AuthorizeRequest(
        model=model, provider=provider,
        owners=common_pb2.Owners(**owners) if owners else None, labels=labels,
        input_bytes=input_bytes, max_output_tokens=cap,
        privacy_mode=0 if privacy is None else privacy.number, reservation_id=rid,
        ttl_seconds=ttl, content=content or "", attempt=attempt, retry_of=retry_of,
        request_id=request_id,
        expected_usage=common_pb2.Usage(**expected) if expected else None)
    assert built == plain
    assert (built.SerializeToString(deterministic=True)
            == plain.SerializeToString(deterministic=True))


@settings(max_examples=300, deadline=None)
@given(rid=st.sampled_from(["", "01J0000000000000000000000"]), model=names,
       provider=st.sampled_from(["", "openai"]),
       owners=st.one_of(st.none(), st.dictionaries(st.sampled_from(OWNER_KEYS), names,
                                                   max_size=3)),
       labels=st.dictionaries(names, names, max_size=2),
       tokens=st.tuples(*[st.integers(0, 1000)] * 5),
       outcome=st.sampled_from(list(Outcome)[1:]),
       input_bytes=st.integers(-1, 1 << 40), revenue=st.integers(0, 10 ** 12),
       attempt=st.integers(0, 5), retry_of=st.sampled_from(["", "r1"]),
       privacy=st.sampled_from([None, PrivacyMode.METADATA_ONLY]),
       estimated=st.booleans(), receipt=st.booleans(),
       tier=st.sampled_from(["", "batch"]), images=st.integers(0, 3))
def test_record_request_is_the_message_of_every_field(
        rid, model, provider, owners, labels, tokens, outcome, input_bytes, revenue,
        attempt, retry_of, privacy, estimated, receipt, tier, images):
    units = {"images": images} if images else {}
    built = cv.record_request(
        rid, event_id="01J0000000000000000000009", model=model, provider=provider,
        owners=owners, labels=labels, input_tokens=tokens[0],
        cached_input_tokens=tokens[1], cache_write_tokens=tokens[2],
        output_tokens=tokens[3], reasoning_tokens=tokens[4], outcome=outcome,
        input_bytes=input_bytes, revenue_nanos=revenue, attempt=attempt,
        retry_of=retry_of, privacy_mode=privacy, usage_estimated=estimated,
        want_receipt=receipt, service_tier=tier, **units)
    plain = meter_pb2.RecordRequest(
        event_id="01J0000000000000000000009", reservation_id=rid, model=model,
        provider=provider, owners=common_pb2.Owners(**owners) if owners else None,
        labels=labels,
        usage=common_pb2.Usage(input_tokens=tokens[0], cached_input_tokens=tokens[1],
                               cache_write_tokens=tokens[2], output_tokens=tokens[3],
                               reasoning_tokens=tokens[4], service_tier=tier, **units),
        outcome=outcome.number, input_bytes=max(0, input_bytes), attempt=attempt,
        retry_of=retry_of, privacy_mode=0 if privacy is None else privacy.number,
        usage_estimated=estimated, want_receipt=receipt)
    if revenue:
        plain.revenue.CopyFrom(cv.to_money(revenue))
    assert built == plain
    assert built.HasField("usage")  # always on the wire, zeros included
    assert (built.SerializeToString(deterministic=True)
            == plain.SerializeToString(deterministic=True))
