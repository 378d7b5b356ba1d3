"""P402 server: the gRPC service, the ledger, the gateways and the command line.

The tree is the architecture. Imports point from the edges to the centre, never
back, and no modules import each other in a circle (tests/proof/test_import_graph.py
checks both from the source).

Edges, where calls and people come in:

- ``cli/``       the `p402` command line, one module per command group, and the demo;
- ``api/``       the gRPC servicers (MeterService, AdminService), the API-key cache,
                 the API reference generated from the protos;
- ``gateways/``  the OpenAI-compatible proxy, Envoy ext_authz and ext_proc, and the
                 runtime embedded in a gateway's process (no gRPC);
- ``dashboard/`` the ledger in a browser;
- ``server.py``  a gRPC server process (start, stop, serve); ``workers.py`` N of them
                 on one port; ``assembly.py`` puts a process's writer, runtime and key
                 cache together; ``listen.py`` says why a port cannot be taken.

Centre, where decisions and money live:

- ``runtime/``   decisions and settlement around the compiled engine (p402core):
                 the tenant runtime, leases of HARD budgets, the server's tunables;
- ``wire/``      the wire contract: protobuf <-> core values (validated, errors naming
                 the field) and the one exception -> gRPC status mapping;
- ``ledger/``    the store (schema, engine, group-commit writer, queries), the
                 canonical encoding and hash chain, evidence and exports, receipts,
                 statements, the price book, billing exports;
- ``privacy/``   privacy modes, redaction, sealed secrets and signed reports.

Utilities anyone may use: ``observe/`` (logs, metrics, traces), ``amounts.py``
(money as text), ``gc_policy.py`` (the garbage collector's settings of a serving
process) and ``httpconn.py`` (aiohttp runners that answer malformed HTTP in the
application's own way).
"""
