"""Operators' metrics: Prometheus text exposition at /metrics on the HTTP port.

Owns the metric names (Prometheus conventions: `p402_` prefix, base units, `_total`
counters, `_seconds` histograms) and how each is measured. One `Metrics` per server
(its own registry: two servers in one process never mix), on unless
`ServerConfig.metrics` is off.

Measured on the request path (a counter increment and a histogram observation, a
few microseconds):
- p402_decisions_total{decision, reason}: Authorize answers by decision (ALLOW,
  WARN, DENY) and by each reason code they carry ("none" when none);
- p402_rpc_duration_seconds{method}: Authorize, Record and RecordBatch latency
  inside the server (from the handler's start to its answer);
- p402_records_total{outcome}: Records settled by outcome;
- p402_writer_batch_events and p402_writer_commit_seconds: events per group-commit
  transaction and how long each took (the writer reports them).
Read when scraped (nothing on the request path):
- p402_writer_{transactions,events,duplicates,retries,dead_letters,splits}_total,
  p402_writer_queue_depth (events waiting for a transaction);
- p402_open_holds{tenant}, p402_held_nanos{tenant, budget} (reserved, not settled);
- p402_lease_nanos{tenant, budget}: HARD budget headroom leased to this process;
  p402_lease_store_round_trips_total and p402_lease_exact_takes_total (with leases on).
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from p402core import Decision, Outcome

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5)
_BATCH = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
def decision_name(number: int) -> str:
    """ALLOW / WARN / DENY (p402core.Decision), or the number of an unknown one."""
    try:
        return Decision(number).name
    except ValueError:
        return str(number)


def outcome_name(number: int) -> str:
    """SUCCESS, PROVIDER_ERROR, … (p402core.Outcome); unset is SUCCESS, as a Record's
    outcome is."""
    try:
        return Outcome(number or Outcome.SUCCESS).name
    except ValueError:
        return str(number)


class Metrics:
    """The server's metrics (module docstring)."""

    def __init__(self, runtime=None, writer=None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter("p402_decisions", "Authorize answers by decision and reason",
                                 ("decision", "reason"), registry=self.registry)
        self.rpc = Histogram("p402_rpc_duration_seconds", "Server-side RPC latency",
                             ("method",), buckets=_LATENCY, registry=self.registry)
        self.records = Counter("p402_records", "Records settled by outcome", ("outcome",),
                               registry=self.registry)
        self.batch = Histogram("p402_writer_batch_events",
                               "Events per group-commit transaction", buckets=_BATCH,
                               registry=self.registry)
        self.commit = Histogram("p402_writer_commit_seconds",
                                "Duration of one group-commit transaction",
                                buckets=_LATENCY, registry=self.registry)
        self._authorize = self.rpc.labels("Authorize")
        self._record = self.rpc.labels("Record")
        self._record_batch = self.rpc.labels("RecordBatch")
        self._runtime, self._writer = runtime, writer
        self._children: dict = {}  # (metric, key) -> its labelled child
        self.registry.register(_Collector(self))
        if writer is not None:
            writer.on_commit = self.committed

    # --- the request path ----------------------------------------------------------

    def authorized(self, resp: Any, started: float, rpc: bool = True) -> None:
        """Count a decision; `rpc`: it was a unary Authorize, whose latency is observed
        (a decision on a stream is not an RPC of its own)."""
        if rpc:
            self._authorize.observe(time.perf_counter() - started)
        for reason in resp.reasons or ("none",):
            self._child(self.decisions, (resp.decision, reason),
                        decision_name(resp.decision), reason).inc()

    def recorded(self, outcomes, started: float, batch: bool = False) -> None:
        (self._record_batch if batch else self._record).observe(time.perf_counter() - started)
        counts: dict = {}
        for outcome in outcomes:  # one increment per outcome of a batch, not per record
            counts[outcome] = counts.get(outcome, 0) + 1
        for outcome, n in counts.items():
            self._child(self.records, outcome, outcome_name(outcome)).inc(n)

    def _child(self, metric, key, *labels):
        """`metric.labels(*labels)`, looked up once per (metric, key): a labels() call
        costs more than the increment it is for."""
        children = self._children
        child = children.get((metric, key))
        if child is None:
            child = children[(metric, key)] = metric.labels(*labels)
        return child

    def committed(self, events: int, seconds: float) -> None:
        self.batch.observe(events)
        self.commit.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    """What is read when scraped: the writer's counters and queue, holds, leases."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        w = self.m._writer
        if w is not None:
            st = w.stats
            for name, value, doc in (
                    ("transactions", st.transactions, "Group-commit transactions"),
                    ("events", st.events, "Events newly written to the ledger"),
                    ("duplicates", st.duplicates, "Events already in the ledger"),
                    ("retries", st.retries, "Transactions retried after an error"),
                    ("dead_letters", st.dead_letters, "Events given up after retries"),
                    ("splits", st.splits, "Batches split to isolate a refused event")):
                yield CounterMetricFamily(f"p402_writer_{name}", doc, value=value)
            yield GaugeMetricFamily("p402_writer_queue_depth",
                                    "Events waiting for a transaction", value=w.queue_depth())
        rt = self.m._runtime
        if rt is None:
            return
        lm = getattr(rt, "leases", None)  # the LeaseManager (scale-out), or None
        if lm is not None:
            yield CounterMetricFamily("p402_lease_store_round_trips",
                                      "Store transactions the lease manager issued",
                                      value=lm.round_trips)
            yield CounterMetricFamily("p402_lease_exact_takes",
                                      "Per-request takes at the very end of a budget",
                                      value=lm.exact_takes)
        holds = GaugeMetricFamily("p402_open_holds", "Open reservations", labels=("tenant",))
        held = GaugeMetricFamily("p402_held_nanos", "Nano-USD reserved on a budget and not "
                                 "settled", labels=("tenant", "budget"))
        lease = GaugeMetricFamily("p402_lease_nanos", "HARD budget headroom leased here",
                                  labels=("tenant", "budget"))
        for tid, t in list(rt.tenants.items()):
            holds.add_metric((tid,), t.engine.open_holds())
            for st in t.engine.budget_status():
                held.add_metric((tid, st.budget_id), st.held_nanos)
            for item in t.engine.lease_status() or ():
                lease.add_metric((tid, item["budget_id"]), item["lease_nanos"])
        yield holds
        yield held
        yield lease


__all__ = ["Metrics", "CONTENT_TYPE"]
