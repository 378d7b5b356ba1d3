"""Integrations of P402 with gateways and frameworks (each imports its framework
lazily: `p402_client.integrations.litellm` needs the `litellm` extra)."""
