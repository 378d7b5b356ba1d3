# cython: language_level=3
"""cdef declarations of the compiled estimate twin, cimported by the engine.

Stable contract: fields and cdef methods are only ever added, never renamed.
"""
from p402core._prices_c cimport ModelPrice


cdef struct Estimate:
    long long input_tokens
    long long output_tokens
    long long cost_nanos


cdef class Estimator:
    cdef readonly long long default_output_cap
    cdef dict _ratios        # model -> calibrated milli-bytes per token (int)

    # Fast paths for the engine: validate the arguments like the public methods
    # (InvalidArgument naming the field) and fill *out. Return 0, or -1 with an
    # exception set.
    cdef int _estimate(self, ModelPrice price, long long input_bytes,
                       long long max_output_tokens, Estimate* out) except -1
    cdef int _estimate_content(self, ModelPrice price, object content,
                               long long max_output_tokens, Estimate* out) except -1
    cdef int _observe(self, ModelPrice price, long long input_bytes,
                      long long input_tokens) except -1
    cdef long long _ratio(self, ModelPrice price) except -1
    cdef int _finish(self, ModelPrice price, long long input_tokens,
                     long long max_output_tokens, Estimate* out) except -1

    cpdef tuple estimate(self, ModelPrice price, object input_bytes,
                         object max_output_tokens=*)
    cpdef tuple estimate_content(self, ModelPrice price, object content,
                                 object max_output_tokens=*)
    cpdef object observe(self, ModelPrice price, object input_bytes, object input_tokens)
    cpdef long long bytes_per_token_milli(self, ModelPrice price) except -1
    cpdef dict snapshot(self)
    cpdef object restore(self, dict state)
