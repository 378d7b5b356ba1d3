"""P402 server: the gRPC service, the store (ledger, rollups, keys) and the CLI."""
