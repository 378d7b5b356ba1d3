"""The P402 gRPC server: assembly, start, graceful stop, and `serve` / `run`.

Owns `create_server(address, *, store, …) -> (server, port)` (grpc.aio, one process,
one event loop), `P402Server` (start / stop / wait), `serve(db_url, listen, …)` (open
the store, serve until SIGTERM/SIGINT, shut down gracefully), `run(…)` (the same
under uvloop when installed) and `init_tenant(store, name)` (a tenant and its first
admin key, for `p402 init`).

Registered services: p402.v1.MeterService, p402.v1.AdminService (and, with
`ext_authz`, envoy.service.auth.v3.Authorization), the standard
grpc.health.v1.Health (each of them SERVING after start, NOT_SERVING once shutdown
begins) and server reflection listing them all (so grpcurl works). `max_concurrent_rpcs` is gRPC's
`maximum_concurrent_rpcs`: past it, calls fail fast with RESOURCE_EXHAUSTED.

Shutdown (`stop(grace)`): health NOT_SERVING; stop accepting calls and let in-flight
ones finish within `grace` seconds; stop the runtime's background task and write
every open hold; flush and stop the group-commit writer. The caller closes the
store it passed in (`serve` closes the one it opened).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from p402.v1 import admin_pb2, admin_pb2_grpc, meter_pb2, meter_pb2_grpc
from p402_server.api.admin_service import AdminService
from p402_server.api.auth import KeyCache
from p402_server.api.meter_service import MeterService
from p402_server.assembly import build_runtime
from p402_server.gc_policy import tune_gc
from p402_server.ledger import open_store
from p402_server.listen import busy, listen_error
from p402_server.privacy.signing import warn_if_unsealed
from p402_server.runtime.config import ServerConfig
from p402_server.runtime.process import Runtime
from p402_server.wire.errors import LenientRegistration

log = logging.getLogger("p402.server")

METER_SERVICE = meter_pb2.DESCRIPTOR.services_by_name["MeterService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
SERVICE_NAMES = (METER_SERVICE, ADMIN_SERVICE)

# ImportPrices carries a whole LiteLLM price map (several MB).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class P402Server:
    """A built (not yet started) server; see the module docstring for the life cycle."""

    def __init__(self, grpc_server, *, port: int, store, writer, runtime: Runtime,
                 auth: KeyCache, health_servicer, config: ServerConfig, own_writer: bool):
        self.grpc_server = grpc_server
        self.port = port
        self.store = store
        self.writer = writer
        self.runtime = runtime
        self.auth = auth
        self.health = health_servicer
        self.config = config
        self._own_writer = own_writer
        self._stopped = False
        # The HTTP dashboard (`--http`), when asked for; see p402_server.dashboard.
        self.dashboard = None
        # The gRPC services with a health status (create_server adds Envoy's).
        self.service_names: tuple[str, ...] = SERVICE_NAMES
        self.http_port = 0

    async def start(self) -> None:
        if self._own_writer:
            await self.writer.start()
        await self.runtime.start()
        await self.grpc_server.start()
        if self.dashboard is not None:
            try:
                self.http_port = await self.dashboard.start()
            except BaseException:  # e.g. its port is taken: undo what started
                await self.stop(0)
                raise
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("p402 serving on port %d (core: %s)", self.port,
                 self.runtime.core.describe())

    async def stop(self, grace: float | None = None) -> None:
        """Drain in-flight calls (up to `grace` s), write open holds, flush the writer."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        log.info("p402 shutting down (grace %.1fs)", grace)
        await self.health.enter_graceful_shutdown()
        if self.dashboard is not None:
            await self.dashboard.stop()
        await self.grpc_server.stop(grace)
        await self.runtime.stop()
        if self._own_writer:
            await self.writer.stop()
        if self.runtime.leases is not None:  # scale-out: after the writer drained
            await self.runtime.leases.close()
        log.info("p402 stopped")

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def create_server(address: str, *, store, config: ServerConfig | None = None,
                  max_concurrent_rpcs: int | None = None, writer=None,
                  core=None, http: str | None = None,
                  dashboard_config=None, ext_authz=None,
                  leases: bool = False, reuse_port: bool = False,
                  metrics: bool = True, otel=None) -> tuple[P402Server, int]:
    """Build the server on `address` ("host:port"; port 0 picks one) -> (server, port).

    `writer` defaults to a new GroupCommitWriter over `store`, started and stopped
    with the server. `core` is a p402core implementation (`p402core.load(...)`),
    default the one `P402_NO_EXTENSIONS` selects. `http` ("host:port"), when given,
    also serves the ledger dashboard there (same loop, store, runtime and key
    cache; `dashboard_config` a `DashboardConfig`); its port is `server.http_port`
    once started. `ext_authz` (True or an `envoy.EnvoyConfig`) also serves Envoy's
    envoy.service.auth.v3.Authorization/Check on the same port (needs xds-protos).
    `leases`: HARD budgets are leased from the store in slices (leases.py; several
    processes or replicas on one ledger); `reuse_port`: bind with SO_REUSEPORT
    (workers.py: several processes sharing one port). `metrics`: count decisions,
    latencies and the writer's work (metrics.py), served at /metrics on the HTTP port.
    `otel`: an otel.Otel (spans and metrics over OTLP), or None (off).
    """
    config = config or ServerConfig()
    if max_concurrent_rpcs is not None:
        config = ServerConfig(**{**_asdict(config), "max_concurrent_rpcs": max_concurrent_rpcs})
    own_writer = writer is None
    writer, runtime, auth, config = build_runtime(store, config=config, core=core,
                                                  writer=writer, leases=leases)
    server = grpc.aio.server(
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # A burst past max_concurrent_rpcs must be refused (RESOURCE_EXHAUSTED),
            # not cancelled by gRPC core's pending-call queue (default 1000).
            ("grpc.server.max_pending_requests",
             max(config.max_pending_calls, config.max_concurrent_rpcs)),
            ("grpc.server.max_pending_requests_hard_limit",
             2 * max(config.max_pending_calls, config.max_concurrent_rpcs)),
        ],
    )
    from p402_server.observe.metrics import Metrics

    meters = Metrics(runtime, writer) if metrics else None
    # P402's own methods: undecodable bytes -> INVALID_ARGUMENT (LenientRegistration).
    lenient = LenientRegistration(server)
    meter_pb2_grpc.add_MeterServiceServicer_to_server(
        MeterService(runtime, auth, max_batch_records=config.max_batch_records,
                     metrics=meters, otel=otel), lenient)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(runtime, auth), lenient)
    services = SERVICE_NAMES
    if ext_authz:  # Envoy ext_authz (p402_server.gateways.envoy), same runtime and key cache
        from p402_server.gateways import envoy, ext_proc

        envoy_config = ext_authz if isinstance(ext_authz, envoy.EnvoyConfig) else None
        envoy.add_to_server(server, runtime, auth, envoy_config)
        # ... and Envoy's external processor (the Record half): ext_proc.py
        ext_proc.add_to_server(server, runtime, auth, envoy_config)
        services = (*services, envoy.SERVICE_NAME, ext_proc.SERVICE_NAME)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Every served service is listed by reflection and has a health status.
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if not reuse_port and busy(address):  # say why before gRPC logs its own error
        raise listen_error(address, flag="--listen", env="P402_LISTEN")
    try:
        port = server.add_insecure_port(address)
        cause = None
    except RuntimeError as exc:  # grpcio raises where older versions returned 0
        port, cause = 0, exc
    if not port:
        raise listen_error(address, flag="--listen", env="P402_LISTEN", cause=cause)
    p402 = P402Server(server, port=port, store=store, writer=writer, runtime=runtime,
                      auth=auth, health_servicer=health_servicer, config=config,
                      own_writer=own_writer)
    p402.service_names = services
    p402.metrics = meters
    if http:
        from p402_server.dashboard import Dashboard, DashboardServer

        p402.dashboard = DashboardServer(
            Dashboard(store=store, runtime=runtime, auth=auth, config=dashboard_config,
                      metrics=meters),
            http)
    return p402, port


def _asdict(config: ServerConfig) -> dict:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


async def init_tenant(store, name: str) -> tuple[str, str]:
    """Create a tenant and its first admin key -> (tenant_id, api_key). The key is
    returned once (only its hash is stored)."""
    tenant_id = await store.create_tenant(name)
    _info, api_key = await store.create_key(tenant_id, ["admin"], "admin (init)")
    return tenant_id, api_key


async def serve(db_url: str, listen: str, *, config: ServerConfig | None = None,
                max_concurrent_rpcs: int | None = None, ready=None,
                stop_event: asyncio.Event | None = None, http: str | None = None,
                dashboard_config=None, ext_authz=None, leases: bool = False,
                reuse_port: bool = False, metrics: bool = True,
                otel_endpoint: str = "", gc_tuning: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (or `stop_event`), then shut down gracefully.

    `ready`, if given, is called with the bound port once the server accepts calls.
    `gc_tuning`: this process is P402's own (`p402 serve`, a worker), so once started
    it sets the garbage collector for serving (gc_policy.py); a host application
    embedding the server keeps its own settings.
    """
    config = config or ServerConfig.from_env()
    warn_if_unsealed()  # once, at start: tenant secrets stored unsealed? (signing.py)
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    # Handlers first: a SIGTERM during start-up still means "stop", gracefully.
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop_event.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread / platform without signals
    try:
        store = await open_store(db_url)
        try:
            if not await store.list_tenants():
                log.warning("no tenant in %s yet: every call will be refused until one "
                            "exists. Create one and its first admin key with `p402 init "
                            "--db %s`", _redact(db_url), _redact(db_url))
            server, port = create_server(listen, store=store, config=config,
                                         max_concurrent_rpcs=max_concurrent_rpcs,
                                         http=http, dashboard_config=dashboard_config,
                                         ext_authz=ext_authz, leases=leases,
                                         reuse_port=reuse_port, metrics=metrics,
                                         otel=_otel(otel_endpoint))
            await server.start()
            if gc_tuning:
                tune_gc()
            try:
                log.info("p402 listening on %s (port %d), ledger %s", listen, port,
                         _redact(db_url))
                if ready is not None:
                    ready(port)
                await stop_event.wait()
            finally:
                await server.stop(config.grace_seconds)
        finally:
            await store.close()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _otel(endpoint: str):
    """An otel.Otel exporting to `endpoint` (or OTEL_EXPORTER_OTLP_ENDPOINT); None
    when neither is set."""
    endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not endpoint:
        return None
    from p402_server.observe.otel import Otel

    log.info("OpenTelemetry export to %s", endpoint)
    return Otel(endpoint=endpoint)


def run(db_url: str, listen: str, **kwargs) -> None:
    """`serve` on a fresh event loop: uvloop when installed, else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(db_url, listen, **kwargs))
    else:
        uvloop.run(serve(db_url, listen, **kwargs))


def _redact(url: str) -> str:
    # Never log a database password.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


__all__ = ["create_server", "P402Server", "serve", "run", "init_tenant", "SERVICE_NAMES"]
