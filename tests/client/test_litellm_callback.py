"""The LiteLLM callback with the real `litellm` package (mock_response, no network)
against a real P402 server: authorize before, record after, owners from LiteLLM
metadata, the cap written into the request, denials as litellm.BudgetExceededError."""
from __future__ import annotations

import asyncio
import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the map
litellm = pytest.importorskip("litellm")
from litellm.integrations.custom_logger import CustomLogger  # noqa: E402

import p402_client as pc  # noqa: E402
from p402_client.integrations.litellm import P402Callback, split_model  # noqa: E402

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Classify this support ticket, please."}]


class Spy(CustomLogger):
    """Sees what LiteLLM finally sent (after P402's hook)."""

    def __init__(self):
        super().__init__()
        self.optional_params: list[dict] = []

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self.optional_params.append(dict(kwargs.get("optional_params") or {}))


@pytest.fixture
async def ap(server, tenant):
    async with pc.AsyncP402Client(server.target, api_key=tenant[1]) as client:
        yield client


def _reset_litellm_callbacks() -> None:
    # LiteLLM copies `callbacks` into its internal success/failure lists on first
    # use and keeps the first instance of a callback class: clear them all, so each
    # test's callback (bound to its own tenant) is the one that runs.
    manager = getattr(litellm, "logging_callback_manager", None)
    if manager is not None and hasattr(manager, "_reset_all_callbacks"):
        manager._reset_all_callbacks()
    else:
        litellm.callbacks = []
        litellm.success_callback, litellm.failure_callback = [], []
        litellm._async_success_callback, litellm._async_failure_callback = [], []


@pytest.fixture
def callbacks():
    _reset_litellm_callbacks()
    yield
    _reset_litellm_callbacks()


async def wait_events(ap, n: int, **filters) -> list[pc.Event]:
    """LiteLLM runs success/failure callbacks in the background: poll (bounded)."""
    for _ in range(100):
        events = sorted([e async for e in ap.iter_query(**filters)], key=lambda e: e.sequence)
        if len(events) >= n:
            return events
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {n} events, got {len(events)}")


def test_split_model():
    assert split_model("openai/gpt-4o-mini") == ("openai", "gpt-4o-mini")
    assert split_model("gpt-4o-mini") == ("", "gpt-4o-mini")
    assert split_model("azure/my-deploy", "azure") == ("azure", "my-deploy")


async def test_success_is_authorized_capped_and_recorded(ap, callbacks):
    await ap.put_policy_rule("cap", "MAX_OUTPUT_TOKENS", max_output_tokens=7)
    spy = Spy()
    litellm.callbacks = [P402Callback(ap, owners={"feature": "triage"},
                                      labels={"env": "test"}), spy]
    resp = await litellm.acompletion(
        model=f"openai/{MODEL}", messages=MESSAGES, mock_response="billing",
        max_tokens=300,
        metadata={"p402": {"customer": "acme", "labels": {"region": "eu"}}})
    (ev,) = await wait_events(ap, 1)
    assert ev.kind == "record" and ev.outcome is pc.Outcome.SUCCESS
    assert ev.model == MODEL and ev.provider == "openai"
    assert ev.owners == pc.Owners(customer="acme", feature="triage")
    assert ev.labels == {"env": "test", "region": "eu"}
    assert ev.usage == pc.Usage(input_tokens=resp.usage.prompt_tokens,
                                output_tokens=resp.usage.completion_tokens)
    assert ev.cost_nanos > 0
    # The allowed cap (the policy's 7), not the 300 asked for, went to the provider.
    await asyncio.sleep(0)
    assert spy.optional_params and spy.optional_params[-1].get("max_tokens") == 7


async def test_timeout_and_provider_error_are_recorded(ap, callbacks):
    litellm.callbacks = [P402Callback(ap, owners={"customer": "acme"})]
    with pytest.raises(litellm.Timeout):
        await litellm.acompletion(
            model=MODEL, messages=MESSAGES, num_retries=0,
            mock_response=litellm.Timeout(message="slow", model=MODEL,
                                          llm_provider="openai"))
    with pytest.raises(litellm.APIError):
        await litellm.acompletion(
            model=MODEL, messages=MESSAGES, num_retries=0,
            mock_response=litellm.APIError(status_code=500, message="boom", model=MODEL,
                                           llm_provider="openai"))
    timeout, error = await wait_events(ap, 2)
    assert timeout.outcome is pc.Outcome.TIMEOUT and timeout.usage.input_tokens > 0
    assert error.outcome is pc.Outcome.PROVIDER_ERROR and error.cost_nanos == 0


async def test_budget_denial_raises_litellms_budget_error(ap, callbacks):
    await ap.put_budget("acme", limit_nanos=1, scope={"customer": "acme"})
    litellm.callbacks = [P402Callback(ap)]
    with pytest.raises(litellm.BudgetExceededError) as err:
        await litellm.acompletion(model=MODEL, messages=MESSAGES, mock_response="x",
                                  metadata={"p402": {"customer": "acme"}})
    denial = err.value.p402_denial
    assert isinstance(denial, pc.BudgetDenied) and "budget.exceeded" in denial.reasons
    assert err.value.max_budget == 1e-9
    # Another customer is not under that budget.
    await litellm.acompletion(model=MODEL, messages=MESSAGES, mock_response="ok",
                              metadata={"p402": {"customer": "globex"}})
    events = await wait_events(ap, 2)
    assert [e.outcome for e in events] == [pc.Outcome.DENIED, pc.Outcome.SUCCESS]


async def test_policy_denial_is_a_budget_error_carrying_the_policy_denial(ap, callbacks):
    await ap.put_policy_rule("owners", "REQUIRE_OWNERS", require_owners=["customer"])
    litellm.callbacks = [P402Callback(ap)]
    with pytest.raises(litellm.BudgetExceededError) as err:
        await litellm.acompletion(model=MODEL, messages=MESSAGES, mock_response="x")
    assert isinstance(err.value.p402_denial, pc.PolicyDenied)
    assert "policy.owner_missing" in err.value.p402_denial.reasons


async def test_proxy_hook_reads_litellm_metadata_and_authorizes_once(ap, callbacks):
    cb = P402Callback(ap)
    data = {"model": MODEL, "messages": MESSAGES, "litellm_call_id": "call-1",
            "litellm_metadata": {"p402": {"customer": "acme", "employee": "e7"}}}
    out = await cb.async_pre_call_hook(None, None, data, "acompletion")
    assert out is data and data["max_tokens"] > 0
    # The deployment hook of the same call does not reserve a second time.
    await cb.async_pre_call_deployment_hook(data, "acompletion")
    assert len(cb._open) == 1
    await cb.async_log_success_event(
        {"litellm_call_id": "call-1"},
        {"usage": {"prompt_tokens": 12, "completion_tokens": 4,
                   "cache_creation_input_tokens": 5}}, None, None)
    (ev,) = await wait_events(ap, 1)
    assert ev.owners == pc.Owners(customer="acme", employee="e7")
    assert ev.usage == pc.Usage(input_tokens=12, cache_write_tokens=5, output_tokens=4)
    assert not cb._open


def test_the_callback_needs_the_async_client(p402):
    with pytest.raises(TypeError):
        P402Callback(p402)
