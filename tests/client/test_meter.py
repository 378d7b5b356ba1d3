"""`meter()` against a real P402 server: authorize on enter, typed denials, the
output cap, record/release on exit by the documented rule, error outcomes mapped
from exceptions, async cancellation, and fail-closed vs fail-open."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

import p402_client as pc
from p402_client.meter import FAIL_OPEN_REASON, outcome_for_exception
from tests.client.serverthread import free_port

MODEL = "gpt-4o-mini"
USD = 1_000_000_000
OWNERS = {"customer": "acme", "feature": "chat"}


def cost_of(p402, input_tokens: int, output_tokens: int) -> int:
    price = p402.list_prices(MODEL).items[0]
    pico = (input_tokens * price.input_pico_per_token
            + output_tokens * price.output_pico_per_token)
    return (pico + 500) // 1000


def only_event(p402) -> pc.Event:
    events = p402.query().items
    assert len(events) == 1, events
    return events[0]


# ---------------------------------------------------------------- success paths


def test_meter_authorizes_then_records_the_usage_given(p402):
    p402.put_budget("acme", limit_nanos=10 * USD, scope={"customer": "acme"})
    with p402.meter(MODEL, owners=OWNERS, input_bytes=4000, max_output_tokens=300,
                    labels={"env": "test"}, revenue_nanos=2_000_000) as m:
        assert m.authorization.decision is pc.Decision.ALLOW
        assert m.output_token_cap == 300
        # The hold is live while the block runs.
        assert p402.list_budgets().items[0].status.held_nanos == \
            m.authorization.estimated_cost_nanos > 0
        m.set_usage(input_tokens=950, output_tokens=120)
    assert isinstance(m.result, pc.RecordResult)
    assert m.result.cost_nanos == cost_of(p402, 950, 120)
    assert m.outcome is pc.Outcome.SUCCESS and m.settled
    ev = only_event(p402)
    assert ev.event_id == m.event_id == m.result.event_id
    assert ev.reservation_id == m.reservation_id
    assert ev.outcome is pc.Outcome.SUCCESS and ev.evidence is pc.Evidence.REPORTED
    assert ev.usage == pc.Usage(input_tokens=950, output_tokens=120)
    assert ev.owners == pc.Owners(customer="acme", feature="chat")
    assert ev.revenue_nanos == 2_000_000
    status = p402.list_budgets().items[0].status
    assert status.held_nanos == 0 and status.committed_nanos == ev.cost_nanos


def test_set_usage_accepts_a_usage_object_or_mapping(p402):
    with p402.meter(MODEL, owners=OWNERS) as m:
        m.set_usage(pc.Usage(input_tokens=10, cached_input_tokens=4, output_tokens=3,
                             reasoning_tokens=1))
    assert only_event(p402).usage == pc.Usage(10, 4, 0, 3, 1)
    with pytest.raises(pc.InvalidArgument) as err:
        m.set_usage({"input_tokens": -1})
    assert err.value.field == "usage.input_tokens"
    with pytest.raises(pc.InvalidArgument) as err:
        m.set_usage(prompt_tokens=3)
    assert err.value.field == "usage.prompt_tokens"


def test_output_cap_is_the_clamped_one(p402):
    p402.put_policy_rule("cap", "MAX_OUTPUT_TOKENS", max_output_tokens=64)
    with p402.meter(MODEL, owners=OWNERS, max_output_tokens=4096) as m:
        assert m.output_token_cap == 64
        assert "policy.output_clamped" in m.authorization.reasons
        m.set_usage(input_tokens=5, output_tokens=64)


def test_explicit_record_inside_the_block_settles_once(p402):
    with p402.meter(MODEL, owners=OWNERS) as m:
        res = m.record(input_tokens=7, output_tokens=2)
        assert isinstance(res, pc.RecordResult) and m.settled
        with pytest.raises(RuntimeError):
            m.record(input_tokens=1)
    assert only_event(p402).usage == pc.Usage(input_tokens=7, output_tokens=2)


def test_explicit_release_voids_the_hold(p402):
    p402.put_budget("all", limit_nanos=USD)
    with p402.meter(MODEL, owners=OWNERS, max_output_tokens=100) as m:
        rel = m.release()
    assert isinstance(rel, pc.ReleaseResult)
    ev = only_event(p402)
    assert ev.kind == "released" and ev.cost_nanos == 0
    assert ev.evidence is pc.Evidence.ESTIMATED
    assert p402.list_budgets().items[0].status.held_nanos == 0


def test_no_usage_after_a_started_call_charges_the_estimate(p402, caplog):
    with caplog.at_level(logging.WARNING, logger="p402_client.meter"):
        with p402.meter(MODEL, owners=OWNERS, input_bytes=2000,
                        max_output_tokens=200) as m:
            pass
    auth = m.authorization
    ev = only_event(p402)
    assert ev.outcome is pc.Outcome.SUCCESS
    assert ev.usage == pc.Usage(input_tokens=auth.estimated_input_tokens,
                                output_tokens=auth.estimated_output_tokens)
    assert ev.cost_nanos == auth.estimated_cost_nanos
    assert "without usage" in caplog.text
    # The usage is the estimate, not a report: the ledger says so.
    assert ev.evidence is pc.Evidence.ESTIMATED


# ---------------------------------------------------------------- denials and warnings


def test_budget_denial_raises_budget_denied_and_never_runs_the_block(p402):
    p402.put_budget("tiny", limit_nanos=1, scope={"customer": "acme"})
    ran = False
    with pytest.raises(pc.BudgetDenied) as err:
        with p402.meter(MODEL, owners=OWNERS, input_bytes=1000, max_output_tokens=100):
            ran = True
    assert not ran
    exc = err.value
    assert isinstance(exc, pc.Denied) and not isinstance(exc, pc.PolicyDenied)
    assert "budget.exceeded" in exc.reasons
    assert exc.authorization.denied and exc.authorization.reservation_id == ""
    assert exc.reason == "budget.exceeded"
    # The denial is in the ledger (written behind): poll briefly.
    for _ in range(50):
        events = p402.query(decisions=["DENY"]).items
        if events:
            break
        time.sleep(0.05)
    assert events and events[0].outcome is pc.Outcome.DENIED


def test_policy_denial_raises_policy_denied(p402):
    p402.put_policy_rule("no-4o-mini", "DENY", models=[MODEL], message="not here")
    with pytest.raises(pc.PolicyDenied) as err:
        with p402.meter(MODEL, owners=OWNERS):
            pytest.fail("the block must not run on a DENY")
    assert not isinstance(err.value, pc.BudgetDenied)
    assert "policy.denied" in err.value.reasons
    assert err.value.rule_ids == ("no-4o-mini",)


def test_warn_lets_the_call_through_and_logs(p402, caplog):
    p402.put_policy_rule("heads-up", "WARN", models=[MODEL])
    # Logged at INFO (a decision the caller holds, not a problem per call).
    with caplog.at_level(logging.INFO, logger="p402_client.meter"):
        with p402.meter(MODEL, owners=OWNERS) as m:
            assert m.authorization.decision is pc.Decision.WARN
            m.set_usage(input_tokens=1, output_tokens=1)
    assert only_event(p402).outcome is pc.Outcome.SUCCESS
    (rec,) = [r for r in caplog.records if "policy.warned" in r.getMessage()]
    assert rec.levelno == logging.INFO


# ---------------------------------------------------------------- errors in the block


class ProviderBoom(Exception):
    pass


class APITimeoutError(Exception):  # named like openai's: a duck-typed timeout
    pass


@pytest.mark.parametrize("exc, outcome", [
    (ProviderBoom("500"), pc.Outcome.PROVIDER_ERROR),
    (TimeoutError(), pc.Outcome.TIMEOUT),
    (APITimeoutError(), pc.Outcome.TIMEOUT),
    (asyncio.CancelledError(), pc.Outcome.CANCELLED),
    (KeyboardInterrupt(), pc.Outcome.CANCELLED),
])
def test_exceptions_map_to_outcomes(exc, outcome):
    assert outcome_for_exception(exc) is outcome
    assert outcome_for_exception(None) is pc.Outcome.SUCCESS


def test_provider_error_is_recorded_without_charge_and_propagates(p402):
    with pytest.raises(ProviderBoom):
        with p402.meter(MODEL, owners=OWNERS, input_bytes=3000) as m:
            raise ProviderBoom("upstream 500")
    ev = only_event(p402)
    assert ev.kind == "record" and ev.outcome is pc.Outcome.PROVIDER_ERROR
    assert ev.usage == pc.Usage() and ev.cost_nanos == 0
    # The reservation's estimate stays on the event beside the zero cost.
    assert ev.estimated_cost_nanos == m.authorization.estimated_cost_nanos > 0
    assert ev.evidence is pc.Evidence.ESTIMATED  # nothing was reported


def test_timeout_charges_the_estimated_input(p402):
    with pytest.raises(TimeoutError):
        with p402.meter(MODEL, owners=OWNERS, input_bytes=3000,
                        max_output_tokens=50) as m:
            raise TimeoutError("read timed out")
    ev = only_event(p402)
    assert ev.outcome is pc.Outcome.TIMEOUT
    assert ev.usage == pc.Usage(input_tokens=m.authorization.estimated_input_tokens)
    assert ev.cost_nanos == cost_of(p402, m.authorization.estimated_input_tokens, 0)
    # Charged the estimate's input tokens: the estimate's evidence.
    assert ev.evidence is pc.Evidence.ESTIMATED
    assert m.result.evidence is pc.Evidence.ESTIMATED


def test_error_usage_none_never_charges(p402):
    with pytest.raises(TimeoutError):
        with p402.meter(MODEL, owners=OWNERS, input_bytes=3000, error_usage="none"):
            raise TimeoutError()
    assert only_event(p402).cost_nanos == 0
    with pytest.raises(pc.InvalidArgument) as err:
        p402.meter(MODEL, error_usage="sometimes")
    assert err.value.field == "error_usage"


def test_usage_given_then_an_error_records_that_usage(p402):
    with pytest.raises(ProviderBoom):
        with p402.meter(MODEL, owners=OWNERS) as m:
            m.set_usage(input_tokens=40, output_tokens=9)  # e.g. a partial stream
            raise ProviderBoom("stream broke")
    ev = only_event(p402)
    assert ev.outcome is pc.Outcome.PROVIDER_ERROR
    assert ev.usage == pc.Usage(input_tokens=40, output_tokens=9)
    assert ev.cost_nanos == cost_of(p402, 40, 9) > 0
    assert ev.evidence is pc.Evidence.REPORTED  # usage given: a report, error or not


def test_not_started_call_that_raises_is_released(p402):
    p402.put_budget("all", limit_nanos=USD)
    with pytest.raises(ValueError):
        with p402.meter(MODEL, owners=OWNERS, started=False) as m:
            raise ValueError("request building failed before the call")
    ev = only_event(p402)
    assert ev.kind == "released" and ev.outcome is pc.Outcome.CANCELLED
    assert p402.list_budgets().items[0].status.held_nanos == 0
    # start() flips it: the same failure after start() is an error record.
    with pytest.raises(ProviderBoom):
        with p402.meter(MODEL, owners=OWNERS, started=False) as m:
            m.start()
            raise ProviderBoom()
    assert p402.query(outcomes=["PROVIDER_ERROR"]).items[0].reservation_id == \
        m.reservation_id


def test_not_started_and_no_usage_releases_even_without_error(p402):
    with p402.meter(MODEL, owners=OWNERS, started=False):
        pass  # e.g. a cache hit: the provider was never called
    assert only_event(p402).kind == "released"


def test_retry_attribution_reaches_the_event(p402):
    with pytest.raises(ProviderBoom):
        with p402.meter(MODEL, owners=OWNERS) as first:
            raise ProviderBoom()
    with p402.meter(MODEL, owners=OWNERS, attempt=1,
                    retry_of=first.reservation_id) as second:
        second.set_usage(input_tokens=3, output_tokens=3)
    ev = [e for e in p402.query().items if e.outcome is pc.Outcome.SUCCESS][0]
    assert ev.attempt == 1 and ev.retry_of == first.reservation_id


def test_meter_must_be_entered_before_use(p402):
    m = p402.meter(MODEL, owners=OWNERS)
    with pytest.raises(RuntimeError):
        _ = m.output_token_cap
    assert pc.meter(p402, MODEL).__class__ is pc.Meter


# ---------------------------------------------------------------- async


async def test_async_meter_records_and_maps_cancellation(server, tenant):
    async with pc.AsyncP402Client(server.target, api_key=tenant[1]) as ap:
        assert pc.meter(ap, MODEL).__class__ is pc.AsyncMeter
        async with ap.meter(MODEL, owners=OWNERS, max_output_tokens=50) as m:
            assert m.output_token_cap == 50
            m.set_usage(input_tokens=12, output_tokens=5)
        assert m.result.cost_nanos > 0

        started = asyncio.Event()
        holder: dict = {}

        async def call():
            async with ap.meter(MODEL, owners=OWNERS, input_bytes=800) as cm:
                holder["m"] = cm
                started.set()
                await asyncio.sleep(30)  # a slow provider call, cancelled below

        task = asyncio.ensure_future(call())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The cancellation did not cancel the Record: it was shielded.
        ev = (await ap.query(outcomes=["CANCELLED"])).items[0]
        assert ev.reservation_id == holder["m"].reservation_id
        assert ev.usage.input_tokens == holder["m"].authorization.estimated_input_tokens
        assert ev.evidence is pc.Evidence.ESTIMATED


async def test_async_meter_denial_and_release(server, tenant):
    async with pc.AsyncP402Client(server.target, api_key=tenant[1]) as ap:
        await ap.put_budget("tiny", limit_nanos=1)
        with pytest.raises(pc.BudgetDenied):
            async with ap.meter(MODEL, owners=OWNERS, max_output_tokens=100):
                pytest.fail("must not run")
        await ap.put_budget("tiny", limit_nanos=USD)
        async with ap.meter(MODEL, owners=OWNERS) as m:
            assert isinstance(await m.release(), pc.ReleaseResult)
        assert (await ap.query()).items[0].kind == "released"


# ---------------------------------------------------------------- P402 unreachable


def dead_client(**kw):
    return pc.P402Client(f"127.0.0.1:{free_port()}", api_key="p402_" + "z" * 40,
                         retries=0, timeout=1.0, **kw)


def test_fail_closed_is_the_default(caplog):
    with dead_client() as p402:
        ran = False
        with pytest.raises(pc.Unavailable):
            with p402.meter(MODEL, owners=OWNERS):
                ran = True
        assert not ran


def test_fail_open_allows_locally_and_logs(caplog):
    with dead_client(fail_open=True) as p402, \
            caplog.at_level(logging.WARNING, logger="p402_client.meter"):
        with p402.meter(MODEL, owners=OWNERS, max_output_tokens=77) as m:
            assert m.fail_open
            assert m.authorization.decision is pc.Decision.ALLOW
            assert m.authorization.reasons == (FAIL_OPEN_REASON,)
            assert m.output_token_cap == 77
            m.set_usage(input_tokens=5, output_tokens=5)
        # The record could not be sent either: logged, not raised (fail-open).
        assert m.result is None and m.event_id
    assert "fail-open" in caplog.text


def test_fail_open_does_not_absorb_bad_input():
    with dead_client(fail_open=True) as p402:
        with pytest.raises(pc.InvalidArgument) as err:
            with p402.meter(MODEL, owners={"team": "x"}):
                pass
        assert err.value.field == "owners"


def test_record_usage_estimated_flag_reaches_the_ledger(p402):
    reported = p402.record(model=MODEL, owners=OWNERS, input_tokens=100)
    estimated = p402.record(model=MODEL, owners=OWNERS, input_tokens=100,
                            usage_estimated=True)
    assert reported.evidence is pc.Evidence.REPORTED
    assert estimated.evidence is pc.Evidence.ESTIMATED
    assert estimated.cost_nanos == reported.cost_nanos
    with pytest.raises(pc.InvalidArgument) as err:
        p402.record(model=MODEL, input_tokens=1, usage_estimated="yes")
    assert err.value.field == "usage_estimated"
