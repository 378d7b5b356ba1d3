# cython: language_level=3
"""cdef declarations of the compiled prices twin, cimported by the engine.

Stable contract: fields and cdef methods are only ever added, never renamed.
"""

# A ModelPrice carries at most this many threshold tiers (the Python twin
# enforces the same bound so both twins accept exactly the same prices).
cdef enum:
    P402_MAX_TIERS = 8
    # rates per row: input, output, cached input, cache write, reasoning
    P402_NRATES = 5
    # usage units beyond the five token counts (p402core._units.UNITS, in order):
    # 5 token kinds (parts of input or output), then 8 quantities
    P402_NUNITS = 13
    P402_NTOKEN_UNITS = 5


cdef class PriceTier:
    cdef readonly long long threshold_tokens
    cdef readonly long long input_pico
    cdef readonly long long output_pico
    cdef readonly object cached_input_pico    # int or None (falls back)
    cdef readonly object cache_write_pico     # int or None
    cdef readonly object reasoning_pico       # int or None


cdef class ModelPrice:
    cdef readonly str model
    cdef readonly str provider
    cdef readonly str family
    cdef readonly str mode
    cdef readonly long long input_pico
    cdef readonly long long output_pico
    cdef readonly object cached_input_pico    # int or None (falls back to input)
    cdef readonly object cache_write_pico     # int or None (falls back to input)
    cdef readonly object reasoning_pico       # int or None (falls back to output)
    cdef readonly tuple tiers                 # PriceTier, ascending threshold
    cdef readonly long long max_input_tokens  # 0 = unknown
    cdef readonly long long max_output_tokens # 0 = unknown / unbounded
    cdef dict _units                          # unit -> pico per unit (p402core._units)
    cdef dict _service_tiers                  # batch / flex / priority -> ModelPrice
    # _units as C: the rate of UNITS[k], or -1 for none (a token kind then bills at
    # its fallback rate of the row, a quantity at 0)
    cdef long long _unit_rates[P402_NUNITS]

    # Effective rates with every fallback resolved: row 0 is the base price,
    # row i (1..n_tiers) is tier i-1. Thresholds ascend.
    cdef int _n_tiers
    cdef long long _thresholds[P402_MAX_TIERS]
    cdef long long _rates[(P402_MAX_TIERS + 1) * P402_NRATES]

    # No validation: the caller has validated the token counts (0..MAX_TOKENS,
    # cached + cache_write <= input, reasoning <= output). Cannot overflow:
    # every term is <= MAX_TOKENS * 10**10 and input/output sums stay <= 2e18.
    cdef void _set_row(self, int row, long long i, long long o, long long c,
                       long long w, long long r)
    cdef long long _checked(self, object input_tokens, object output_tokens,
                            object cached_input_tokens, object cache_write_tokens,
                            object reasoning_tokens) except -1
    cdef long long _cost_pico(self, long long input_tokens, long long output_tokens,
                              long long cached, long long cache_write,
                              long long reasoning) except? -1
    cpdef object cost_pico(self, object input_tokens, object output_tokens,
                           object cached_input_tokens=*, object cache_write_tokens=*,
                           object reasoning_tokens=*)
    cpdef object cost_nanos(self, object input_tokens, object output_tokens,
                            object cached_input_tokens=*, object cache_write_tokens=*,
                            object reasoning_tokens=*)
    cpdef dict to_dict(self)
    # The exact cost of validated token counts with extra units ({unit: count},
    # validated here, errors as p402core._units names them), at these rates.
    cdef object _cost_units(self, long long i, long long o, long long c, long long w,
                            long long r, object units)


cdef class Catalog:
    cdef dict _prices        # canonical name -> ModelPrice
    cdef dict _aliases       # alias -> canonical name
    cdef dict _bare          # bare name (known provider prefix stripped) -> tuple of canonical names
    cdef dict _resolved      # bounded cache: (model, provider) -> ModelPrice or None
    cdef frozenset _prefixes # known provider prefixes
    cdef readonly str version
    cdef readonly str taken
    cdef readonly str source
    cdef readonly tuple skipped   # ((name, reason), ...) from an import
    cdef readonly tuple rounded   # ((name, field), ...) prices rounded on import

    cpdef ModelPrice lookup(self, str model, str provider=*)
    cdef ModelPrice _resolve(self, str model, str provider)
    cdef object _exact(self, str name)
    cdef object _match(self, str name, str hint)
