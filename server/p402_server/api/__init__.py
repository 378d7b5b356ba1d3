"""The servicers: MeterService (Authorize, Record, Query and their streams) and
AdminService (keys, budgets, policies, prices, settings, evidence keys, price book,
statements), the API-key cache that authenticates every call, and the API reference
generated from the protos' comments. A servicer authenticates, hands the request to
the tenant runtime (p402_server.runtime.tenant) and answers; it decides nothing itself."""
