"""p402core: P402's decision core — prices, estimates, budgets, policies, fingerprints
(and the per-event work of the ledger and of the proxy's stream relay).

No I/O, no asyncio: pure computation and in-memory state, compiled with Cython.
Each compiled module `_<name>_c` has a pure-Python twin `_<name>_py` with the same
API, which is its executable specification. `IMPLEMENTATION` says which one runs;
`P402_NO_EXTENSIONS=1` forces the twins. `load("python")` / `load("compiled")`
give either one explicitly (tests run every core test against both).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._enums import *  # noqa: F401,F403  (the shared vocabulary)
from ._enums import __all__ as _enum_names
from ._impl import IMPLEMENTATION, CoreNotBuilt, load

if TYPE_CHECKING:  # type checkers see the twins' real signatures
    from ._prices_py import *  # noqa: F401,F403
    from ._estimate_py import *  # noqa: F401,F403
    from ._budget_py import *  # noqa: F401,F403
    from ._policy_py import *  # noqa: F401,F403
    from ._fingerprint_py import *  # noqa: F401,F403
    from ._engine_py import *  # noqa: F401,F403
    from ._ledger_py import *  # noqa: F401,F403
    from ._stream_py import *  # noqa: F401,F403


def __getattr__(attr: str):
    # Resolved on first use so `import p402core` stays cheap; cached afterwards.
    value = getattr(load(IMPLEMENTATION), attr)
    globals()[attr] = value
    return value


__all__ = ["IMPLEMENTATION", "CoreNotBuilt", "load", *_enum_names]
