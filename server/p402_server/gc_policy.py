"""The garbage collector's settings for a long-running P402 process (`p402 serve`,
`p402 proxy`, each worker: `serve(..., gc_tuning=True)` and `serve_proxy(...,
gc_tuning=True)` apply them once started; an application embedding either keeps its
own).

Every call allocates and frees thousands of small containers (requests, dicts,
futures); almost all die by reference counting. CPython's default first threshold
(700 net new containers) still runs a young collection every few calls, and a full
collection every few thousand, which walks every live object (the price catalog,
protobuf descriptors, open holds): measured in `p402 proxy --db` at 32 connections,
about 8% of the process's CPU in collections and full collections of 40-90 ms, a
pause every in-flight call waits through. `tune_gc()` raises the thresholds (cyclic
garbage is still collected, less often: a young collection per 50,000 net new
containers) and freezes what start-up made (it lives as long as the process, so no
collection needs to walk it).

The price of rarer collections: cyclic garbage that survives a young collection (a
call still in flight when it ran) waits much longer for a full one, with whatever it
holds. So the call path must not make reference cycles that hold a call's state; a
refused call ends by setting its status, not by raising through gRPC
(`wire.errors.fail`), and a test holds every refused call free of them.

`P402_GC=default` keeps Python's own settings; `P402_GC=T0,T1,T2` sets the thresholds.
"""
from __future__ import annotations

import gc
import logging
import os

log = logging.getLogger("p402.gc")

THRESHOLDS = (50_000, 50, 100)


def thresholds_from_env(value: str | None) -> tuple[int, int, int] | None:
    """P402_GC's thresholds: None for "default" (Python's own); ValueError, naming the
    variable, for anything but "default" or three positive integers."""
    if value is None or value.strip() == "":
        return THRESHOLDS
    if value.strip().lower() == "default":
        return None
    parts = value.split(",")
    try:
        nums = tuple(int(p) for p in parts)
    except ValueError:
        nums = ()
    if len(nums) != 3 or min(nums) < 1:
        raise ValueError(f"P402_GC: expected 'default' or three positive integers "
                         f"T0,T1,T2, got {value!r}")
    return nums  # type: ignore[return-value]


def tune_gc() -> tuple[int, int, int]:
    """Apply the settings (module docstring) once start-up is done; returns the
    thresholds in force."""
    thresholds = thresholds_from_env(os.environ.get("P402_GC"))
    if thresholds is None:
        return gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    log.debug("gc thresholds %s, %d start-up objects frozen", thresholds,
              gc.get_freeze_count())
    return thresholds


__all__ = ["THRESHOLDS", "thresholds_from_env", "tune_gc"]
