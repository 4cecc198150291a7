"""Searches on the grid of float64 values: the exact float where a monotone function crosses a value.

An analytic inverse computed in floating point can land a few floats away from the true crossing, and far
in a flat tail several floats share one function value. :func:`largest_at_most` starts from such a guess
and walks the float grid (doubling steps, then bisection on the floats' ordered integer codes) to the
largest float ``x`` with ``fn(x) <= value``.

Example:
    >>> t = largest_at_most(cal.normalize_scores, np.array([0.9]), np.array([12.3]))
    >>> bool(cal.normalize_scores(np.nextafter(t, np.inf)) > 0.9 >= cal.normalize_scores(t))
    True
"""

from __future__ import annotations

from typing import Callable

import numpy as np

#: ordered code of the largest finite float64 (the codes of finite floats are -MAX_CODE..MAX_CODE)
MAX_CODE = int(np.float64(np.finfo(np.float64).max).view(np.int64))
_SIGN = np.uint64(1 << 63)
_MAX_STEP = 1 << 62


def float_codes(x) -> np.ndarray:
    """Each float's position on the float64 grid (int64): consecutive floats differ by 1, -0.0 and 0.0 are 0."""
    i = np.asarray(x, dtype=np.float64).view(np.int64)
    return np.where(i >= 0, i, -(i & np.int64(0x7FFFFFFFFFFFFFFF)))


def code_floats(codes) -> np.ndarray:
    """Inverse of :func:`float_codes`."""
    k = np.asarray(codes, dtype=np.int64)
    bits = np.abs(k).astype(np.uint64)
    return np.where(k < 0, bits | _SIGN, bits).view(np.float64)


def largest_at_most(fn: Callable[[np.ndarray], np.ndarray], values, guesses) -> np.ndarray:
    """For each ``value``, the largest finite float ``x`` with ``fn(x) <= value`` (``fn`` non-decreasing).

    All values are searched together (one ``fn`` call per step for all of them): steps that double from the
    guess until the answer is bracketed, then bisection on the float grid.

    Args:
        fn: a vectorised non-decreasing function of float64 arrays.
        values: finite targets.
        guesses: starting points near the answers (e.g. an analytic inverse), finite or not.

    Returns:
        float64 array shaped as ``values``: ``-inf`` where even the lowest finite float has ``fn(x) > value``,
        ``+inf`` where ``fn(x) <= value`` for every finite float.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    big = np.finfo(np.float64).max
    g = float_codes(np.clip(np.nan_to_num(np.asarray(guesses, dtype=np.float64).ravel()), -big, big))

    def ok(codes: np.ndarray, which: np.ndarray) -> np.ndarray:
        return fn(code_floats(codes[which])) <= v[which]

    lo, hi, step = g.copy(), np.minimum(g, MAX_CODE) + 1, np.ones_like(g)  # MAX_CODE + 1 stands for +inf
    todo = np.arange(v.size)
    while todo.size:  # down until ok(lo); hi: the last code found not ok (or the guess + 1)
        bad = ~ok(lo, todo)
        todo = todo[bad & (lo[todo] > -MAX_CODE)]
        s = step[todo]
        hi[todo] = lo[todo]
        lo[todo] = np.where(lo[todo] > -MAX_CODE + s, lo[todo] - s, -MAX_CODE)
        step[todo] = np.minimum(s * 2, _MAX_STEP)
    none = ~ok(lo, np.arange(v.size))  # even the lowest float is above the value
    step[:] = 1
    todo = np.flatnonzero(~none & (hi <= MAX_CODE))
    while todo.size:  # up until not ok(hi)
        good = ok(hi, todo)
        todo = todo[good]
        s = step[todo]
        lo[todo] = hi[todo]
        hi[todo] = np.where(hi[todo] < MAX_CODE + 1 - s, hi[todo] + s, MAX_CODE + 1)
        step[todo] = np.minimum(s * 2, _MAX_STEP)
        todo = todo[hi[todo] <= MAX_CODE]
    todo = np.flatnonzero(~none & (hi - lo > 1))
    while todo.size:  # bisection: ok(lo), not ok(hi)
        a, b = lo[todo], hi[todo]
        mid = (a >> 1) + (b >> 1) + (a & b & 1)  # floor((a + b) / 2) without overflow
        good = fn(code_floats(mid)) <= v[todo]
        lo[todo] = np.where(good, mid, a)
        hi[todo] = np.where(good, b, mid)
        todo = todo[hi[todo] - lo[todo] > 1]
    out = np.where(none, -np.inf, np.where(lo >= MAX_CODE, np.inf, code_floats(lo)))
    return out.reshape(np.shape(values))
