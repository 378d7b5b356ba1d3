# cython: language_level=3
"""cdef declarations of the compiled budget twin, cimported by the engine.

Stable contract: fields and cdef methods are only ever added, never renamed.
The cdef fast paths skip validation: the caller passes a BudgetSet of this
book's current generation (see `_current`), amounts in 0..MAX_NANOS + 1 and
now_ms >= 0.
"""
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint64_t


cdef struct Slot:
    int64_t limit
    int64_t soft
    int64_t committed
    int64_t held
    int64_t start          # current period [start, end); end = -1: none yet
    int64_t end
    int64_t lease
    int64_t lease_base     # committed + held when the lease was granted
    int period
    int enforcement
    int leased


cdef class Budget:
    cdef readonly str budget_id
    cdef readonly long long limit_nanos
    cdef readonly int period
    cdef readonly long long soft_limit_nanos
    cdef readonly int enforcement
    cdef dict _scope
    cdef int _n_owner
    cdef int _owner_idx[6]
    cdef tuple _owner_vals
    cdef tuple _label_conds     # ((key, value), ...)

    cdef bint _matches(self, tuple owners, dict labels)


cdef class BudgetStatus:
    cdef readonly str budget_id
    cdef readonly long long limit_nanos
    cdef readonly long long committed_nanos
    cdef readonly long long held_nanos
    cdef readonly long long remaining_nanos
    cdef readonly long long period_start_ms
    cdef readonly int enforcement


cdef class BudgetSet:
    cdef readonly tuple indices
    cdef readonly tuple budget_ids
    cdef readonly long long generation
    cdef int n
    cdef int* idx


cdef class BudgetBook:
    cdef Slot* _slots
    cdef int _n
    cdef tuple _budgets
    cdef dict _index           # budget_id -> index
    cdef dict _sets            # interned BudgetSets of this generation
    # direct-mapped cache of _sets by match bitmask (books of <= 64 budgets):
    # a hit costs no Python int. _cache_sets is a list of 64 owned references
    # (BudgetSet or None), so an entry can never outlive its set.
    cdef uint64_t _cache_mask[64]
    cdef list _cache_sets
    cdef int* _scratch         # match buffer, _n ints
    # Match index (see _build_index): bitsets of _nw words over the budgets.
    # _words[0:_nw] = every budget; per condition c (an owner dimension or a
    # label key some scope tests): _words[_creq[c]:] = the budgets testing it,
    # and _cvals[c] maps each tested value to the offset of the budgets wanting it.
    cdef int _nw
    cdef uint64_t* _words
    cdef uint64_t* _work
    cdef int _ncond
    cdef int* _ckind           # 0: owner dimension _cdim[c]; 1: label _ckeys[c]
    cdef int* _cdim
    cdef int* _creq
    cdef tuple _ckeys
    cdef tuple _cvals
    cdef readonly long long generation

    cdef BudgetSet _match_set(self, tuple owners, dict labels)
    cdef BudgetSet _set_for_ids(self, tuple budget_ids)
    cdef BudgetSet _current(self, BudgetSet bs)
    # 1 when held on every budget of bs, 0 when a HARD budget cannot fit it
    cdef int _reserve(self, BudgetSet bs, int64_t amount, int64_t now_ms) except -1
    cdef int64_t _headroom(self, BudgetSet bs, int64_t now_ms) except -1
    cdef int _any_over_soft(self, BudgetSet bs, int64_t now_ms) except -1
    cdef int _release(self, BudgetSet bs, int64_t amount) except -1
    cdef int _commit(self, BudgetSet bs, int64_t cost, int64_t now_ms) except -1
    cdef int _settle(self, BudgetSet bs, int64_t held, int64_t cost, int64_t now_ms) except -1
    # hold `amount` on every budget of bs unconditionally (restoring holds)
    cdef int _add_held(self, BudgetSet bs, int64_t amount, int64_t now_ms) except -1
    # One pass for the engine's authorize: reserve all-or-none like _reserve and,
    # when held, write (committed, held, period_start) per budget of bs into out
    # (3 * bs.n values). 0 = blocked (nothing held, out untouched), 1 = held,
    # 2 = held and some budget is past its soft limit (or a SOFT one past its limit).
    cdef int _reserve_into(self, BudgetSet bs, int64_t amount, int64_t now_ms,
                           int64_t* out) except -1
    # (committed, held, period_start) per budget of bs into out, rolling periods
    cdef int _counters_into(self, BudgetSet bs, int64_t now_ms, int64_t* out) except -1
    cdef BudgetStatus _status(self, int i, int64_t now_ms)
    cdef void _clear_cache(self)
    cdef tuple _statuses(self, BudgetSet bs, int64_t now_ms)
    # private helpers of the Python API
    cdef _install(self, tuple budgets, Slot* slots)
    cdef _build_index(self, tuple budgets)
    cdef void _free_index(self)
    cdef BudgetSet _interned(self, tuple indices)
    cdef BudgetSet _checked(self, object indices, object now_ms, int64_t* now)
    cdef int64_t _amount(self, str field, object amount) except? -1
    cdef int _slot_index(self, object budget_id) except -1


# Validation shared with the compiled engine (same checks and messages as the
# Python twin's helpers of the same names).
cdef int64_t check_i64(str field, object value, int64_t lo, int64_t hi) except? -1
cdef str check_str(str field, object value, bint required)
cpdef tuple owners_tuple(object owners, str field=*)
cpdef dict labels_dict(object labels, str field=*)
