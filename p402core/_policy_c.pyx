# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Policy evaluation and rate limits — the compiled twin of `_policy_py`.

Same API and the same results, bit for bit (see `_policy_py` for the semantics:
evaluation order, reasons, token buckets in unit-milliseconds, bucket
carry-over and eviction). Here each rule is compiled into a `_CRule` with C
fields: the effect and privacy masks as ints, owner conditions as a C array of
owner indexes beside a tuple of interned values, model globs pre-split into an
exact set, literal prefixes and one regex. `evaluate` walks that tuple and
touches Python objects only to compare strings and build the result.

Overflow: every bucket quantity is <= rate_limit x window_ms <= 2**62 (`Rule`
enforces it), demands are clamped to the capacity before they are scaled, and
refills are compared before they are added, so no int64 arithmetic overflows.

One room, though long: a compiled twin mirrors `_policy_py` rule for rule, so the
two are read and changed side by side.
"""
cimport cython
from cpython.long cimport PyLong_AsLongLongAndOverflow
from sys import intern
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.stdlib cimport calloc, free

from p402core._enums import (
    MAX_LABELS,
    MAX_STRING,
    MAX_TOKENS,
    POLICY_DENIED,
    POLICY_MODEL_NOT_ALLOWED,
    POLICY_OWNER_MISSING,
    POLICY_PRIVACY_MODE_NOT_ALLOWED,
    POLICY_WARNED,
    Decision,
    InvalidArgument,
)
from p402core._rule import (
    MAX_NANOS,
    Rule,
    as_rule,
    count_arg,
    labels_arg,
    owners_arg,
    parse_key,
    parse_rate_state,
    privacy_arg,
    split_globs,
    str_arg,
)

DEFAULT_MAX_BUCKETS = 65_536
MEMO_SLOTS = 8_192   # direct-mapped memo of evaluations per RuleSet
cdef enum:
    C_MEMO_SLOTS = 8192
    C_MEMO_SHIFT = 51    # 64 - log2(C_MEMO_SLOTS)

# Values of the shared enums (p402core._enums), as C constants.
cdef enum:
    D_ALLOW = 1
    D_WARN = 2
    D_DENY = 3
    E_DENY = 1
    E_WARN = 2
    E_REQUIRE = 3
    E_ALLOW_MODELS = 4
    E_MAX_OUT = 5
    E_MAX_COST = 6
    E_RATE = 7
    E_PRIVACY = 8
    U_REQUESTS = 1
    U_TOKENS = 2
    U_COST = 3
    N_OWNERS = 6
    PM_MAX = 5
    # reason slots (index into _REASONS)
    R_DENIED = 0
    R_WARNED = 1
    R_OWNER = 2
    R_MODEL = 3
    R_PRIVACY = 4
    N_REASONS = 5

cdef tuple _REASONS = (POLICY_DENIED, POLICY_WARNED, POLICY_OWNER_MISSING,
                       POLICY_MODEL_NOT_ALLOWED, POLICY_PRIVACY_MODE_NOT_ALLOWED)
cdef Py_ssize_t _MAX_STRING = MAX_STRING
cdef Py_ssize_t _MAX_LABELS = MAX_LABELS
cdef long long _MAX_TOKENS = MAX_TOKENS
cdef long long _MAX_NANOS = MAX_NANOS
cdef tuple _EMPTY = ()


# -- argument fast paths (fall back to the shared checks for anything unusual) -----------

cdef inline bint _short_str(object v):
    return type(v) is str and PyUnicode_GET_LENGTH(v) <= _MAX_STRING


cdef tuple _owners(object owners):
    cdef Py_ssize_t i
    if type(owners) is tuple and PyTuple_GET_SIZE(owners) == N_OWNERS:
        for i in range(N_OWNERS):
            if not _short_str(<object>PyTuple_GET_ITEM(owners, i)):
                return owners_arg(owners)
        return <tuple>owners
    return owners_arg(owners)


cdef dict _labels(object labels):
    if labels is None:
        return None
    if type(labels) is dict and len(<dict>labels) <= _MAX_LABELS:
        for k, v in (<dict>labels).items():
            if not (_short_str(k) and _short_str(v) and PyUnicode_GET_LENGTH(k) > 0):
                return labels_arg(labels)
        return <dict>labels
    return labels_arg(labels)


cdef str _string(str field, object value):
    if _short_str(value):
        return <str>value
    return str_arg(field, value)


cdef int _privacy(object value) except -1:
    cdef long long v
    cdef int overflow = 0
    if type(value) is int:
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 1 <= v <= PM_MAX:
            return <int>v
    return privacy_arg(value)


cdef long long _count(str field, object value, long long hi) except -1:
    cdef long long v
    cdef int overflow = 0
    if type(value) is int:
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 0 <= v <= hi:
            return v
    return count_arg(field, value, hi)


cdef inline int _check_result(object result) except -1:
    if result is None:
        raise TypeError("result must be a PolicyResult, not NoneType")
    return 0


# -- results ----------------------------------------------------------------------

cdef class PolicyResult:
    """The outcome of `RuleSet.evaluate`: data, never an exception. Read-only.

    Results are memoized per RuleSet, so one object may be returned for many
    calls: it must never change (it has no setters)."""

    def __cinit__(self, *args, **kwargs):
        self._limiters = _EMPTY

    def __init__(self, decision=D_ALLOW, reasons=(), rule_ids=(), output_cap=0,
                 max_cost_nanos=0, output_cap_rule_id="", max_cost_rule_id=""):
        self.decision = int(decision)
        self.reasons = tuple(reasons)
        self.rule_ids = tuple(rule_ids)
        self.output_cap = int(output_cap)
        self.max_cost_nanos = int(max_cost_nanos)
        self.output_cap_rule_id = str(output_cap_rule_id)
        self.max_cost_rule_id = str(max_cost_rule_id)
        self._limiters = _EMPTY

    def __repr__(self):
        return (f"PolicyResult(decision={Decision(self.decision).name}, reasons={self.reasons!r}, "
                f"rule_ids={self.rule_ids!r}, output_cap={self.output_cap}, "
                f"max_cost_nanos={self.max_cost_nanos})")


# -- model globs ---------------------------------------------------------------------

cdef class _Globs:
    """A rule's model globs, pre-split (see `_rule.split_globs`)."""
    cdef frozenset exact
    cdef tuple prefixes
    cdef object regex

    def __init__(self, globs):
        self.exact, self.prefixes, self.regex = split_globs(globs)

    cdef bint match(self, str model) except -1:
        cdef Py_ssize_t i
        if model in self.exact:
            return True
        for i in range(PyTuple_GET_SIZE(self.prefixes)):
            if model.startswith(<str>PyTuple_GET_ITEM(self.prefixes, i)):
                return True
        return self.regex is not None and self.regex.match(model) is not None


# -- token buckets ------------------------------------------------------------------

@cython.final
@cython.no_gc
cdef class _Bucket:
    cdef long long level      # units x window_ms, 0..capacity
    cdef long long last_ms
    cdef long long seq        # the limiter's consume counter at its last consume (LRU)


cdef class _Limiter:
    """A RATE_LIMIT rule's parameters and its buckets {per value: _Bucket}."""
    cdef str rule_id
    cdef tuple key
    cdef int unit
    cdef long long rate
    cdef long long window_ms
    cdef long long capacity
    cdef int per_index
    cdef dict buckets
    cdef Py_ssize_t max_buckets
    cdef long long seq        # consume counter: orders buckets by last use

    def __init__(self, rule, Py_ssize_t max_buckets):
        self.rule_id = rule.rule_id
        self.key = rule.limiter_key
        self.unit = rule.rate_unit
        self.rate = rule.rate_limit
        self.window_ms = rule.window_seconds * 1000
        self.capacity = self.rate * self.window_ms          # <= 2**62 (Rule checks)
        self.per_index = parse_key("per", rule.per)[0] if rule.per else -1
        self.buckets = {}
        self.max_buckets = max_buckets

    cdef inline long long demand(self, long long tokens, long long cost_nanos):
        if self.unit == U_REQUESTS:
            return 1
        return tokens if self.unit == U_TOKENS else cost_nanos

    cdef inline long long level(self, _Bucket bucket, long long now_ms):
        cdef long long level, add
        level = bucket.level
        if now_ms > bucket.last_ms:
            # A full window refills any bucket: clamp elapsed first, then compare
            # before adding, so nothing here can overflow.
            add = now_ms - bucket.last_ms
            if add > self.window_ms:
                add = self.window_ms
            add *= self.rate
            if add >= self.capacity - level:
                level = self.capacity
            else:
                level += add
        return level

    cdef inline object key_of(self, tuple owners):
        if self.per_index >= 0:
            return <object>PyTuple_GET_ITEM(owners, self.per_index)
        return ""

    cdef long long wait_ms(self, tuple owners, long long tokens, long long cost_nanos,
                           long long now_ms) except -2:
        cdef long long n = self.demand(tokens, cost_nanos)
        cdef long long deficit
        cdef object found
        if n > self.rate:
            return -1
        found = self.buckets.get(self.key_of(owners))
        if found is None:
            deficit = n * self.window_ms - self.capacity
        else:
            deficit = n * self.window_ms - self.level(<_Bucket>found, now_ms)
        if deficit <= 0:
            return 0
        # deficit > 0 and rate > 0, and deficit + rate <= 2**62 + 2**52: C division is exact here.
        return (deficit + self.rate - 1) // self.rate

    cdef int consume(self, tuple owners, long long tokens, long long cost_nanos,
                     long long now_ms) except -1:
        cdef long long n = self.demand(tokens, cost_nanos)
        cdef object key = self.key_of(owners)
        cdef dict buckets = self.buckets
        cdef object found = buckets.get(key)
        cdef _Bucket bucket
        cdef bint new = found is None
        if new:
            bucket = _Bucket.__new__(_Bucket)
            bucket.level = self.capacity
            bucket.last_ms = now_ms
            buckets[key] = bucket
        else:
            bucket = <_Bucket>found
            bucket.level = self.level(bucket, now_ms)
            if now_ms > bucket.last_ms:
                bucket.last_ms = now_ms
        # LRU order is the consume counter, not dict order: no pop/re-insert
        self.seq += 1
        bucket.seq = self.seq
        if n >= self.rate:
            bucket.level = 0
        else:
            bucket.level -= n * self.window_ms
            if bucket.level < 0:
                bucket.level = 0
        if new and len(buckets) > self.max_buckets:
            self.evict(now_ms)
        return 0

    cdef list lru(self):
        """(key, bucket) pairs, least recently consumed first."""
        return sorted(self.buckets.items(), key=_bucket_seq)

    cdef int evict(self, long long now_ms) except -1:
        cdef dict buckets = self.buckets
        cdef list drop = [k for k, b in buckets.items()
                          if self.level(<_Bucket>b, now_ms) >= self.capacity]
        for k in drop:
            del buckets[k]
        cdef Py_ssize_t target = self.max_buckets - self.max_buckets // 8
        cdef Py_ssize_t excess = len(buckets) - target
        if excess > 0:
            for k, _ in self.lru()[:excess]:
                del buckets[k]
        return 0


def _bucket_seq(item):
    return (<_Bucket>item[1]).seq


# -- compiled rules -------------------------------------------------------------------

cdef unsigned int _mask(modes):
    cdef unsigned int mask = 0
    for mode in modes:
        mask |= 1u << <int>mode
    return mask


cdef class _CRule:
    """One rule, flattened for evaluation."""
    cdef str rule_id
    cdef int effect
    cdef unsigned int pmask            # match: allowed privacy modes as bits, 0 = any
    cdef int n_oc
    cdef int oc_idx[N_OWNERS]          # match: owner index ...
    cdef tuple oc_val                  # ... and the value it must equal
    cdef tuple label_conds             # match: (key, value, key, value, ...)
    cdef frozenset providers           # match: None = any
    cdef _Globs models                 # match: None = any
    cdef int n_req
    cdef int req_idx[N_OWNERS]         # REQUIRE_OWNERS: owner indexes
    cdef tuple req_labels              # REQUIRE_OWNERS: label keys
    cdef _Globs allow                  # ALLOW_MODELS
    cdef unsigned int allowed_pmask    # PRIVACY
    cdef long long limit               # MAX_OUTPUT_TOKENS / MAX_COST_PER_REQUEST
    cdef _Limiter limiter              # RATE_LIMIT

    def __init__(self, rule, _Limiter limiter):
        cdef int index
        self.rule_id = rule.rule_id
        self.effect = rule.effect
        self.pmask = _mask(rule.privacy_modes)
        self.n_oc = 0
        values, labels = [], []
        for key, value in rule.owner_conditions:
            index, label = parse_key("owners", key)
            if index >= 0:
                self.oc_idx[self.n_oc] = index
                self.n_oc += 1
                values.append(intern(value))
            else:
                # interned: label lookups hit the key by identity, hash cached
                labels.extend((intern(label), intern(value)))
        self.oc_val = tuple(values)
        self.label_conds = tuple(labels)
        self.providers = frozenset(rule.providers) if rule.providers else None
        self.models = _Globs(rule.models) if rule.models else None
        self.n_req = 0
        req_labels = []
        for key in rule.require_owners:
            index, label = parse_key("require_owners", key)
            if index >= 0:
                self.req_idx[self.n_req] = index
                self.n_req += 1
            else:
                req_labels.append(intern(label))
        self.req_labels = tuple(req_labels)
        self.allow = _Globs(rule.allow_models) if rule.allow_models else None
        self.allowed_pmask = _mask(rule.allowed_privacy_modes)
        self.limit = rule.max_output_tokens or rule.max_cost_nanos
        self.limiter = limiter

    cdef bint matches(self, tuple owners, dict labels, str model, str provider,
                      int privacy_mode) except -1:
        cdef int j
        cdef Py_ssize_t n
        if self.pmask and not (self.pmask >> privacy_mode) & 1:
            return False
        for j in range(self.n_oc):
            if (<str>PyTuple_GET_ITEM(owners, self.oc_idx[j])
                    != <str>PyTuple_GET_ITEM(self.oc_val, j)):
                return False
        n = PyTuple_GET_SIZE(self.label_conds)
        if n:
            for j in range(0, n, 2):
                if _label(labels, <object>PyTuple_GET_ITEM(self.label_conds, j)) != \
                        <str>PyTuple_GET_ITEM(self.label_conds, j + 1):
                    return False
        if self.providers is not None and provider not in self.providers:
            return False
        return self.models is None or self.models.match(model)

    cdef bint owner_missing(self, tuple owners, dict labels) except -1:
        cdef int j
        for j in range(self.n_req):
            if PyUnicode_GET_LENGTH(<str>PyTuple_GET_ITEM(owners, self.req_idx[j])) == 0:
                return True
        for key in self.req_labels:
            if not _label(labels, key):
                return True
        return False


cdef inline str _label(dict labels, object key):
    if labels is None:
        return ""
    return <str>labels.get(key, "")


# -- the rule set -------------------------------------------------------------------

cdef inline bint _same(PyObject* a, object b) except -1:
    # identity first: the common hit has the very same tuple / interned str
    return a == <PyObject*>b or <object>a == b


cdef inline bint _labels_same(tuple key, dict labels, tuple label_keys, Py_ssize_t nk) except -1:
    cdef Py_ssize_t k
    for k in range(nk):
        if not _same(PyTuple_GET_ITEM(key, 4 + k),
                     _label(labels, <object>PyTuple_GET_ITEM(label_keys, k))):
            return False
    return True


cdef PolicyResult _make_result(int decision, tuple reasons, tuple rule_ids,
                               long long output_cap, long long max_cost,
                               str cap_id, str cost_id, tuple limiters):
    cdef PolicyResult r = PolicyResult.__new__(PolicyResult)
    r.decision = decision
    r.reasons = reasons
    r.rule_ids = rule_ids
    r.output_cap = output_cap
    r.max_cost_nanos = max_cost
    r.output_cap_rule_id = cap_id
    r.max_cost_rule_id = cost_id
    r._limiters = limiters
    return r


cdef class RuleSet:
    """An immutable, compiled list of rules plus the rate-limit bucket state.

    Replacing the rules is building a new RuleSet (`with_rules` carries bucket
    state over); the engine swaps the reference, which is atomic.
    """

    def __cinit__(self, *args, **kwargs):
        # an empty, usable set even if __init__ never runs (RuleSet.__new__)
        self.rules = ()
        self._crules = ()
        self._n = 0
        self._limiters = {}
        self._label_keys = ()
        self._memo = None
        self._memo_hash = NULL
        self.max_buckets = DEFAULT_MAX_BUCKETS

    def __init__(self, rules=(), *, max_buckets=DEFAULT_MAX_BUCKETS):
        if isinstance(rules, (str, bytes)) or isinstance(rules, dict):
            raise InvalidArgument("rules", "must be a list of rules")
        try:
            items = list(rules)
        except TypeError:
            raise InvalidArgument("rules", "must be a list of rules") from None
        self.max_buckets = count_arg("max_buckets", max_buckets, MAX_NANOS)
        if self.max_buckets < 1:
            raise InvalidArgument("max_buckets", "must be at least 1")
        parsed = tuple(as_rule(item) for item in items)
        seen = set()
        for rule in parsed:
            if rule.rule_id in seen:
                raise InvalidArgument("rules", f"duplicate rule_id {rule.rule_id!r}")
            seen.add(rule.rule_id)
        self.rules = parsed
        self._limiters = {}
        self._model_cache = {}
        compiled = []
        for rule in parsed:
            limiter = None
            if rule.effect == E_RATE:
                limiter = _Limiter(rule, self.max_buckets)
                self._limiters[rule.rule_id] = limiter
            compiled.append(_CRule(rule, limiter))
        self._crules = tuple(compiled)
        self._n = len(compiled)
        keys = set()
        for crule in compiled:
            keys.update((<_CRule>crule).label_conds[0::2])
            keys.update((<_CRule>crule).req_labels)
        self._label_keys = tuple(sorted(keys))
        self._memo = None      # allocated at the first evaluation

    def __dealloc__(self):
        free(self._memo_hash)

    def __len__(self):
        return self._n

    def __repr__(self):
        return f"RuleSet({self._n} rules)"

    cpdef RuleSet with_rules(self, object rules):
        """A new RuleSet of `rules`; RATE_LIMIT rules whose id and limiter
        parameters are unchanged keep their buckets (shared, not copied)."""
        cdef RuleSet new = RuleSet(rules, max_buckets=self.max_buckets)
        cdef _Limiter limiter
        for rule_id, obj in new._limiters.items():
            limiter = <_Limiter>obj
            old = self._limiters.get(rule_id)
            if old is not None and (<_Limiter>old).key == limiter.key:
                limiter.buckets = (<_Limiter>old).buckets
                limiter.seq = (<_Limiter>old).seq   # the LRU order continues
        return new

    # -- rate-limit state -------------------------------------------------------------
    def snapshot(self):
        """Rate-limit bucket state as plain data (format: `_policy_py`)."""
        cdef _Limiter lim
        out = {}
        for rule_id, obj in self._limiters.items():
            lim = <_Limiter>obj
            out[rule_id] = {"key": list(lim.key),
                            "buckets": [[k, (<_Bucket>b).level, (<_Bucket>b).last_ms]
                                        for k, b in lim.lru()]}
        return {"version": 1, "limiters": out}

    def restore(self, state):
        """Put bucket state from `snapshot()` back into the RATE_LIMIT rules
        with the same id and limiter_key (see `_policy_py`)."""
        cdef _Limiter lim
        cdef _Bucket b
        limits = {rule_id: ((<_Limiter>obj).key, (<_Limiter>obj).capacity,
                            (<_Limiter>obj).max_buckets)
                  for rule_id, obj in self._limiters.items()}
        for rule_id, buckets in parse_rate_state(state, limits):
            lim = <_Limiter>self._limiters[rule_id]
            lim.buckets.clear()
            for key, level, last_ms in buckets:
                b = _Bucket.__new__(_Bucket)
                b.level = level
                b.last_ms = last_ms
                lim.seq += 1
                b.seq = lim.seq
                lim.buckets[key] = b

    # -- evaluation -----------------------------------------------------------------
    cpdef PolicyResult evaluate(self, object owners, object labels, object model,
                                object provider, object privacy_mode):
        """Every matching rule, most severe decision, all reasons (see `_policy_py`)."""
        return self._evaluate(_owners(owners), _labels(labels), _string("model", model),
                              _string("provider", provider), _privacy(privacy_mode))

    cdef PolicyResult _evaluate(self, tuple owners, dict labels, str model, str provider,
                                int privacy_mode):
        # Memo: a direct-mapped table keyed by the inputs evaluation reads.
        # A hit costs the hash of ~10 str (their hashes are cached by CPython)
        # and identity compares; a miss evaluates and replaces the slot.
        cdef Py_ssize_t k, nk = PyTuple_GET_SIZE(self._label_keys)
        cdef unsigned long long h = <unsigned long long>privacy_mode * 0x9E3779B97F4A7C15ULL
        cdef int slot
        cdef object entry, lv
        cdef tuple key
        cdef list parts
        cdef PolicyResult result
        for k in range(N_OWNERS):
            h = (h ^ <unsigned long long>hash(<str>PyTuple_GET_ITEM(owners, k))) * 0x100000001B3ULL
        h = (h ^ <unsigned long long>hash(model)) * 0x100000001B3ULL
        h = (h ^ <unsigned long long>hash(provider)) * 0x100000001B3ULL
        for k in range(nk):
            lv = _label(labels, <object>PyTuple_GET_ITEM(self._label_keys, k))
            h = (h ^ <unsigned long long>hash(lv)) * 0x100000001B3ULL
        h ^= h >> 29
        h *= 0xBF58476D1CE4E5B9ULL
        slot = <int>(h >> C_MEMO_SHIFT)
        if self._memo is None:
            self._memo_hash = <unsigned long long*>calloc(C_MEMO_SLOTS, sizeof(unsigned long long))
            if self._memo_hash == NULL:
                raise MemoryError()
            self._memo = [None] * C_MEMO_SLOTS
        entry = self._memo[slot]
        if entry is not None and self._memo_hash[slot] == h:
            key = <tuple>PyTuple_GET_ITEM(<tuple>entry, 0)
            if (_same(PyTuple_GET_ITEM(key, 0), owners)
                    and _same(PyTuple_GET_ITEM(key, 1), model)
                    and _same(PyTuple_GET_ITEM(key, 2), provider)
                    and <int>(<object>PyTuple_GET_ITEM(key, 3)) == privacy_mode
                    and _labels_same(key, labels, self._label_keys, nk)):
                return <PolicyResult>PyTuple_GET_ITEM(<tuple>entry, 1)
        result = self._compute(owners, labels, model, provider, privacy_mode)
        parts = [owners, model, provider, privacy_mode]
        for k in range(nk):
            parts.append(_label(labels, <object>PyTuple_GET_ITEM(self._label_keys, k)))
        self._memo[slot] = (tuple(parts), result)
        self._memo_hash[slot] = h
        return result

    cdef PolicyResult _compute(self, tuple owners, dict labels, str model, str provider,
                               int privacy_mode):
        cdef int decision = D_ALLOW
        cdef int severity, reason
        cdef unsigned int seen = 0
        cdef int order[N_REASONS]
        cdef int n_reasons = 0
        cdef list rule_ids = None
        cdef list limiters = None
        cdef long long output_cap = 0, max_cost = 0
        cdef str cap_id = "", cost_id = ""
        cdef Py_ssize_t i
        cdef _CRule rule
        for i in range(self._n):
            rule = <_CRule>PyTuple_GET_ITEM(self._crules, i)
            if not rule.matches(owners, labels, model, provider, privacy_mode):
                continue
            reason = -1
            severity = D_DENY
            if rule.effect == E_DENY:
                reason = R_DENIED
            elif rule.effect == E_WARN:
                reason = R_WARNED
                severity = D_WARN
            elif rule.effect == E_REQUIRE:
                if rule.owner_missing(owners, labels):
                    reason = R_OWNER
            elif rule.effect == E_ALLOW_MODELS:
                if not rule.allow.match(model):
                    reason = R_MODEL
            elif rule.effect == E_PRIVACY:
                if not (rule.allowed_pmask >> privacy_mode) & 1:
                    reason = R_PRIVACY
            elif rule.effect == E_MAX_OUT:
                if output_cap == 0 or rule.limit < output_cap:
                    output_cap = rule.limit
                    cap_id = rule.rule_id
            elif rule.effect == E_MAX_COST:
                if max_cost == 0 or rule.limit < max_cost:
                    max_cost = rule.limit
                    cost_id = rule.rule_id
            elif rule.effect == E_RATE:
                if limiters is None:
                    limiters = []
                limiters.append(rule.limiter)
            if reason >= 0:
                if severity > decision:
                    decision = severity
                if not (seen >> reason) & 1:
                    seen |= 1u << reason
                    order[n_reasons] = reason
                    n_reasons += 1
                if rule_ids is None:
                    rule_ids = []
                rule_ids.append(rule.rule_id)
        cdef tuple reasons = _EMPTY
        if n_reasons:
            reasons = tuple([_REASONS[order[i]] for i in range(n_reasons)])
        return _make_result(decision, reasons,
                            _EMPTY if rule_ids is None else tuple(rule_ids),
                            output_cap, max_cost, cap_id, cost_id,
                            _EMPTY if limiters is None else tuple(limiters))

    # -- rate limits --------------------------------------------------------------------
    cpdef str rate_check(self, PolicyResult result, object owners, object tokens,
                         object cost_nanos, object now_ms):
        """"" if every matching RATE_LIMIT bucket has room, else the first rule_id
        whose bucket has not. Consumes nothing."""
        _check_result(result)
        return self._rate_check(result, _owners(owners), _count("tokens", tokens, _MAX_TOKENS),
                                _count("cost_nanos", cost_nanos, _MAX_NANOS),
                                _count("now_ms", now_ms, _MAX_NANOS))

    cpdef object rate_consume(self, PolicyResult result, object owners, object tokens,
                              object cost_nanos, object now_ms):
        """Deduct the demand from every matching RATE_LIMIT bucket (floored at empty)."""
        _check_result(result)
        self._rate_consume(result, _owners(owners), _count("tokens", tokens, _MAX_TOKENS),
                           _count("cost_nanos", cost_nanos, _MAX_NANOS),
                           _count("now_ms", now_ms, _MAX_NANOS))

    cpdef long long retry_after_ms(self, PolicyResult result, object owners, object tokens,
                                   object cost_nanos, object now_ms) except -2:
        """Milliseconds until every matching bucket has room for this demand
        (0 = now), or -1 if the demand exceeds some bucket's whole capacity."""
        _check_result(result)
        return self._retry_after_ms(result, _owners(owners),
                                    _count("tokens", tokens, _MAX_TOKENS),
                                    _count("cost_nanos", cost_nanos, _MAX_NANOS),
                                    _count("now_ms", now_ms, _MAX_NANOS))

    cdef str _rate_check(self, PolicyResult result, tuple owners, long long tokens,
                         long long cost_nanos, long long now_ms):
        cdef _Limiter limiter
        for obj in result._limiters:
            limiter = <_Limiter>obj
            if limiter.wait_ms(owners, tokens, cost_nanos, now_ms) != 0:
                return limiter.rule_id
        return ""

    cdef int _rate_consume(self, PolicyResult result, tuple owners, long long tokens,
                           long long cost_nanos, long long now_ms) except -1:
        for obj in result._limiters:
            (<_Limiter>obj).consume(owners, tokens, cost_nanos, now_ms)
        return 0

    cdef long long _retry_after_ms(self, PolicyResult result, tuple owners,
                                   long long tokens, long long cost_nanos,
                                   long long now_ms) except -2:
        cdef long long wait = 0, w
        for obj in result._limiters:
            w = (<_Limiter>obj).wait_ms(owners, tokens, cost_nanos, now_ms)
            if w < 0:
                return -1
            if w > wait:
                wait = w
        return wait


__all__ = ["Rule", "RuleSet", "PolicyResult"]
