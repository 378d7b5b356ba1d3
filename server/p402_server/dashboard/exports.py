"""Export streams for the dashboard's download buttons (CSV, JSONL, FOCUS).

Owns turning one filtered export into download text, chunk by chunk. The rows, the
chain columns and the signed digest are the CLI's (`p402 export`): the events come
from `evidence.ChainedExport` (the same object `ExportEvents` streams, each event
with its `prev_chain_hash`), rows are `evidence.event_row`, written by
`evidence.ExportWriter`, and the digest signed with the tenant's evidence key ends
the file as a trailer (JSONL: a last `{"digest": …}` line; CSV and FOCUS: a last
`# digest {…}` line), so a download checks with `p402 verify --file` as it is.
"""
from __future__ import annotations

import io
from collections.abc import AsyncIterator

from p402_server.dashboard import filters as F
from p402_server.ledger import evidence

FORMATS = ("csv", "jsonl", "focus")
CHUNK = 65536


async def stream(store, tenant_id: str, flt, fmt_name: str, settings: dict
                 ) -> AsyncIterator[str]:
    """Export text chunks (about 64 KiB each) of the events matching `flt`, ending
    with the signed digest (module docstring)."""
    export = evidence.ChainedExport(store, tenant_id, flt)
    buf = io.StringIO()
    writer = evidence.ExportWriter(buf, fmt_name)  # writes the CSV header, if any
    async for e in export.events():
        writer.row(evidence.event_row(e))
        if buf.tell() >= CHUNK:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    writer.digest(export.finish(settings, F.now_ms()))
    yield buf.getvalue()


__all__ = ["FORMATS", "stream"]
