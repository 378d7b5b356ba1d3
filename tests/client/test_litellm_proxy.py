"""The LiteLLM proxy server (a subprocess, no database) in front of the stand-in
upstream, with P402's proxy hook loaded from its config.yaml as an operator would:
a budget denial is a 402 to the OpenAI client and never reaches the upstream, an
allowed call lands in the ledger with LiteLLM's usage, a failed upstream call is
given back (cost 0)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

# Checked in a subprocess: importing LiteLLM's proxy server here would reconfigure
# logging and LiteLLM's globals for every other test of this process.
if subprocess.run([sys.executable, "-c", "import litellm.proxy.proxy_server"],
                  capture_output=True, env={**os.environ,
                                            "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
                  ).returncode != 0:
    pytest.skip("the LiteLLM proxy's dependencies are not installed (extra `litellm`)",
                allow_module_level=True)

import openai  # noqa: E402

import p402_client as pc  # noqa: E402
from tests.support.openai_standin import OpenAIStandin  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UPSTREAM_KEY = "sk-upstream-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def litellm_proxy(server, tmp_path):
    tenant_id, admin_key = server.new_tenant("litellm-proxy")
    with pc.P402Client(server.target, api_key=admin_key) as p402:
        meter_key = p402.create_key("litellm", ["meter"]).api_key
    with OpenAIStandin.in_thread(api_key=UPSTREAM_KEY) as up:
        (tmp_path / "p402_hook.py").write_text(
            "from p402_client.integrations.litellm_proxy import proxy_handler_instance\n")
        (tmp_path / "config.yaml").write_text(f"""
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {up.base_url}
      api_key: {UPSTREAM_KEY}
litellm_settings:
  callbacks: p402_hook.proxy_handler_instance
  num_retries: 0
""")
        port = _free_port()
        master = "sk-p402-test-" + os.urandom(16).hex()  # the proxy refuses to run without
        env = {**os.environ, "P402_TARGET": server.target, "P402_API_KEY": meter_key,
               "LITELLM_MASTER_KEY": master,
               "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        env.pop("DATABASE_URL", None)
        log = open(tmp_path / "litellm.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "litellm.proxy.proxy_cli", "--config",
             str(tmp_path / "config.yaml"), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", "1"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if proc.poll() is not None:
                        break
                    time.sleep(0.3)
            else:
                pytest.fail("the LiteLLM proxy did not start: "
                            + (tmp_path / "litellm.log").read_text()[-3000:])
            if proc.poll() is not None:
                pytest.fail("the LiteLLM proxy exited: "
                            + (tmp_path / "litellm.log").read_text()[-3000:])
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}", api_key=master,
                                   max_retries=0, timeout=30)
            yield client, up, pc.P402Client(server.target, api_key=admin_key)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def _events(p402, n: int, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        items = p402.query(page_size=100).items
        if len(items) >= n or time.monotonic() > deadline:
            return list(reversed(items))
        time.sleep(0.1)


def test_deny_record_and_give_back_through_the_litellm_proxy(litellm_proxy):
    client, up, p402 = litellm_proxy
    messages = [{"role": "user", "content": "Summarize the quarterly numbers, please."}]
    # allowed: in the ledger with LiteLLM's usage and the request's user as customer
    r = client.chat.completions.create(model="gpt-4o-mini", messages=messages, user="acme")
    assert r.usage.completion_tokens > 0
    [ev] = _events(p402, 1)
    assert ev.owners.customer == "acme" and ev.outcome.value == "SUCCESS"
    assert (ev.usage.input_tokens, ev.usage.output_tokens) == (r.usage.prompt_tokens,
                                                               r.usage.completion_tokens)
    assert ev.cost_nanos > 0
    # a failed upstream call: PROVIDER_ERROR, cost 0 (the reservation given back)
    up.fail_next(500)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, user="acme")
    failed = [e for e in _events(p402, 2) if e.outcome.value != "SUCCESS"]
    assert failed and failed[0].cost_nanos == 0
    # denied: a HARD budget that cannot pay -> 402, the upstream never called
    p402.put_budget("acme-cap", limit_nanos=1, period="TOTAL", enforcement="HARD",
                    scope={"customer": "acme"})
    calls = len(up.requests)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, user="acme")
    assert info.value.status_code == 402
    assert "budget.exceeded" in str(info.value)
    assert len(up.requests) == calls
    # another customer is not held to acme's budget
    ok = client.chat.completions.create(model="gpt-4o-mini", messages=messages, user="globex")
    assert ok.choices[0].message.content
