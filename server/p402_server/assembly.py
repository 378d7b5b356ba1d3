"""The parts of a P402 server that are not its transport, put together once: the
group-commit writer, the tenant runtime (with its lease manager when leases are on)
and the API key cache. `p402 serve` (server.py) puts a gRPC server in front of them;
the embedded runtime of `p402 proxy --db` (inprocess.py) calls them directly.
"""
from __future__ import annotations

import p402core
from p402_server.api.auth import KeyCache
from p402_server.ledger import GroupCommitWriter
from p402_server.runtime.config import ServerConfig
from p402_server.runtime.process import Runtime


def build_runtime(store, *, config: ServerConfig | None = None, core=None, writer=None,
                  leases: bool = False):
    """The parts of a server that are not its transport -> (writer, runtime, auth,
    config): the group-commit writer (a new one over `store` unless given), the
    tenant runtime (with a LeaseManager when `leases`) and the key cache. Shared by
    `server.create_server` and the in-process runtime (inprocess.EmbeddedP402)."""
    config = config or ServerConfig()
    # Every core module imports now: a missing compiled build fails here, with the
    # way out (p402core.CoreNotBuilt), not as INTERNAL on the first call.
    core = (core or p402core.load(p402core.IMPLEMENTATION)).check()
    if writer is None:
        writer = GroupCommitWriter(store, max_batch=config.writer_max_batch,
                                   max_delay_ms=config.writer_max_delay_ms)
    lease_manager = None
    if leases:
        from p402_server.runtime.leases import LeaseManager

        lease_manager = LeaseManager(store)
    runtime = Runtime(store, writer, config, core=core, leases=lease_manager)
    auth = KeyCache(store, revalidate_seconds=config.auth_revalidate_seconds,
                    negative_seconds=config.auth_negative_seconds,
                    max_entries=config.auth_cache_entries)
    return writer, runtime, auth, config
