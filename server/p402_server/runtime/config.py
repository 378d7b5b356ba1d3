"""Server configuration: the knobs of the gRPC service, in one validated object.

Owns `ServerConfig` (defaults, validation, `from_env`). Everything that reads a
tunable (the server, the tenant runtime, the auth cache) takes it from here, so a
flag, an environment variable and an attribute share one name.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from p402core import InvalidArgument

ENV_PREFIX = "P402_"


def env_values(cls, prefix: str, environ: Mapping[str, str] | None = None) -> dict:
    """{field: value} of the numeric dataclass `cls`'s fields set as `<prefix><FIELD>`
    in `environ` (default os.environ); a value that does not parse is InvalidArgument
    naming the field and the variable. Shared by ServerConfig and leases.LeaseConfig."""
    environ = os.environ if environ is None else environ
    values: dict = {}
    for f in dataclasses.fields(cls):
        raw = environ.get(prefix + f.name.upper())
        if raw is None or raw == "":
            continue
        kind = int if f.type in ("int", int) else float
        try:
            values[f.name] = kind(raw)
        except ValueError:
            raise InvalidArgument(
                f.name, f"{prefix + f.name.upper()}={raw!r} is not a {kind.__name__}"
            ) from None
    return values


@dataclass(frozen=True, slots=True)
class ServerConfig:
    # Backpressure: past this many calls in flight clients get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 1024
    # Calls gRPC core has accepted but the server has not picked up yet (a burst):
    # past this many it CANCELS calls (silently, for the client), so it is kept far
    # above max_concurrent_rpcs; the server refuses the excess with
    # RESOURCE_EXHAUSTED instead (grpc.server.max_pending_requests; its hard limit
    # is twice this).
    max_pending_calls: int = 20_000
    # Shutdown: how long in-flight calls may take to finish after SIGTERM.
    grace_seconds: float = 10.0
    # Auth cache: a known key is re-checked against the store at most this often
    # (revocations made through this server apply at once regardless).
    auth_revalidate_seconds: float = 5.0
    # Unknown keys are remembered this long, so a flood of bad keys does not
    # become a flood of store reads.
    auth_negative_seconds: float = 1.0
    auth_cache_entries: int = 100_000
    # Background work of the tenant runtime.
    expire_interval_seconds: float = 1.0
    holds_flush_interval_seconds: float = 0.25
    # Scale-out (leases on): how often a process reads the config versions of the
    # tenants it serves, so an admin change made through another process sharing
    # the store reaches its engine within about this long.
    config_poll_seconds: float = 1.0
    # Group-commit writer.
    writer_max_batch: int = 1000
    writer_max_delay_ms: float = 2.0
    # Per tenant: event ids / reservation ids remembered for idempotent retries, and
    # at most this many MiB of them (estimated) in each of its three memories (events
    # by id, by reservation, Authorize answers), whatever their owners and labels
    # weigh. Beyond memory a retry is answered from the ledger.
    recent_ids: int = 100_000
    recent_ids_mib: float = 128.0
    # Per tenant: the prompts open holds keep for their Records (only under a privacy
    # mode that keeps text) take at most this many MiB; past it a hold keeps the
    # prompt's fingerprint alone.
    held_prompts_mib: float = 256.0
    # Largest RecordBatch accepted in one call.
    max_batch_records: int = 10_000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgument(f.name, f"must be a number, not {value!r}")
            if not math.isfinite(value):
                raise InvalidArgument(f.name, f"must be a finite number, not {value!r}")
            if f.name == "auth_negative_seconds" or f.name == "writer_max_delay_ms":
                if value < 0:
                    raise InvalidArgument(f.name, f"must be >= 0, got {value}")
            elif value <= 0:
                raise InvalidArgument(f.name, f"must be > 0, got {value}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> ServerConfig:
        """Defaults, then `P402_<FIELD>` variables (e.g. P402_MAX_CONCURRENT_RPCS),
        then explicit keyword overrides (flags win over the environment)."""
        values = env_values(cls, ENV_PREFIX, environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidArgument(name, "unknown server setting")
        return cls(**values)


__all__ = ["ServerConfig"]
