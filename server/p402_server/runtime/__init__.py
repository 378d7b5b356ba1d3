"""Decisions and settlement: the per-tenant runtime around the compiled engine
(authorize, record, release, expire, config sync, settlement across processes:
tenant.py), HARD-budget leases shared through the store (leases.py), the server's
tunables (config.py). p402_server.assembly puts a runtime together with its writer
and the key cache for a process."""
