"""Decisions and settlement around the compiled engine (p402core), one module per idea:

- tenant.py       TenantRuntime: a tenant's engine, built and restored, and the
                  contract its parts share (its docstring);
- deciding.py     Authorize, in memory, and the privacy rules it applies;
- settling.py     Record and Release of this process's reservations; idempotency;
- status.py       budget status, the engine's or (leases on) the store's;
- foreign.py      settling reservations another process made (claims, notices);
- expiring.py     expiry, and open holds saved to the store;
- documents.py    receipts, statements, the price book, evidence keys;
- config_sync.py  admin swaps and reloads of a config another process changed;
- process.py      Runtime: every tenant of a process and the background task;
- leases.py       HARD-budget leases shared through the store;
- shared.py       ids, reasons, the clock and small types the others share;
- config.py       the server's tunables.

p402_server.assembly puts a Runtime together with its writer and the key cache.
"""
