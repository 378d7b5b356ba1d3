"""Gateways that meter calls they did not originate: the OpenAI-compatible proxy
(proxy.py), Envoy's ext_authz and ext_proc (envoy.py, ext_proc.py), and the runtime
embedded in a gateway's own process without gRPC (inprocess.py). They reach the
centre only through the meter service's contract, as any client would."""
