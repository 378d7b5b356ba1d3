# cython: language_level=3
"""cdef declarations of the compiled policy twin, cimported by the engine.

Stable contract: fields and cdef methods are only ever added, never renamed.

Two ways in for the engine:
- the cpdef methods, same arguments and checks as the Python twin (owners as a
  6-tuple of str or a mapping; InvalidArgument naming the field on bad input);
- the cdef `_evaluate` / `_rate_check` / `_rate_consume` / `_retry_after_ms` fast
  paths, which skip validation: the caller has already validated owners (a
  6-tuple of str), labels (dict or None), model/provider (str), privacy_mode
  (1..5) and the counts (0 <= tokens <= MAX_TOKENS, cost_nanos >= 0, now_ms >= 0).
"""


cdef class PolicyResult:
    cdef readonly int decision            # Decision value: ALLOW, WARN or DENY
    cdef readonly tuple reasons           # reason codes, deduplicated, rule order
    cdef readonly tuple rule_ids          # ids of the rules that gave a reason
    cdef readonly long long output_cap    # min MAX_OUTPUT_TOKENS of matches, 0 = none
    cdef readonly long long max_cost_nanos  # min MAX_COST_PER_REQUEST, 0 = none
    cdef readonly str output_cap_rule_id  # first rule holding output_cap ("" = none)
    cdef readonly str max_cost_rule_id    # first rule holding max_cost_nanos
    cdef tuple _limiters                  # matching RATE_LIMIT rules (opaque)


cdef class RuleSet:
    cdef readonly tuple rules             # the Rule spec objects, in order
    cdef readonly Py_ssize_t max_buckets  # rate-limit buckets kept per rule
    cdef tuple _crules                    # compiled rules, same order
    cdef Py_ssize_t _n
    cdef dict _limiters                   # rule_id -> limiter (bucket state)
    cdef dict _model_cache                # reserved: model -> per-rule glob bits
    # Evaluation memo: evaluate() reads only owners, the label keys in
    # _label_keys, model, provider and privacy mode, and a RuleSet never
    # changes, so equal inputs give an equal (immutable) PolicyResult.
    cdef list _memo                       # MEMO_SLOTS entries: (key tuple, result) or None
    cdef unsigned long long* _memo_hash   # the hash of each slot's key
    cdef tuple _label_keys                # label keys any rule reads, sorted

    cdef PolicyResult _evaluate(self, tuple owners, dict labels, str model,
                                str provider, int privacy_mode)
    cdef PolicyResult _compute(self, tuple owners, dict labels, str model,
                               str provider, int privacy_mode)
    cdef str _rate_check(self, PolicyResult result, tuple owners, long long tokens,
                         long long cost_nanos, long long now_ms)
    cdef int _rate_consume(self, PolicyResult result, tuple owners, long long tokens,
                           long long cost_nanos, long long now_ms) except -1
    cdef long long _retry_after_ms(self, PolicyResult result, tuple owners,
                                   long long tokens, long long cost_nanos,
                                   long long now_ms) except -2

    cpdef PolicyResult evaluate(self, object owners, object labels, object model,
                                object provider, object privacy_mode)
    cpdef str rate_check(self, PolicyResult result, object owners, object tokens,
                         object cost_nanos, object now_ms)
    cpdef object rate_consume(self, PolicyResult result, object owners, object tokens,
                              object cost_nanos, object now_ms)
    cpdef long long retry_after_ms(self, PolicyResult result, object owners,
                                   object tokens, object cost_nanos,
                                   object now_ms) except -2
    cpdef RuleSet with_rules(self, object rules)
