"""What an operator sees of a running server: structured logs with request ids
(logs.py), Prometheus metrics (metrics.py) and OpenTelemetry spans and metrics
(otel.py)."""
