"""Test support shared by several test packages (no tests here).

- `openai_standin`: a deterministic OpenAI-compatible upstream on 127.0.0.1 (aiohttp),
  for the proxy, SDK and integration tests.
"""
