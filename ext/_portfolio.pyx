# cython: language_level=3
"""Portfolio-margin kernel: the scenario revaluation (portfolios x scenarios x legs).

Pure and stateless; assumes clean input (the checked API is engine/risk/portfolio.py,
which also holds the plain-Python reference this kernel is tested against). Runs
without the GIL.

Per leg, in the portfolio's settle asset, at scenario ``s`` (``F' = F (1 + m_s)``,
``sigma' = sigma (1 + v_s)``), with ``size = q cs``::

    USD value U:  linear  size F'
                  inverse -size                    (cs in USD: a constant USD amount)
                  option  size B76(F', K, T, sigma', r)
    value V = U / F' (coin-settled portfolio) or U (USD-settled)

Black-76 (``D = e^(-rT)``, ``N(x) = erfc(-x/sqrt 2)/2``)::

    d1 = ln(F'/K) / (sigma' sqrt T) + sigma' sqrt T / 2,   d2 = d1 - sigma' sqrt T
    call = D (F' N(d1) - K N(d2)),   put = D (K N(-d2) - F' N(-d1))
    T <= 0: intrinsic;  sigma' <= 0: D * intrinsic

Per portfolio::

    loss_s      = w_s (sum_i V_i(0) - sum_i V_i(s))
    short_min   = short_option_min * sum_(options, size < 0) |size| (F if USD, 1 if coin)
    requirement = max(max_s loss_s, short_min, 0);  worst = first s of the largest loss_s

``ln(F'/K)`` is computed as ``ln(F/K) + ln(1 + m_s)`` (one log per leg and one per
scenario, not per pair); the reference takes ``ln(F'/K)`` directly, so the two differ by
a few ulps of the log, well inside the tests' tolerance.
"""

from libc.math cimport log, log1p, sqrt, exp, erfc, fmax
from libc.stdint cimport int8_t, int32_t, int64_t
from libc.stdlib cimport malloc, free

cdef enum:                              # leg kinds (engine.risk.portfolio.LEG_*)
    LEG_LINEAR = 0                      # linear perp / future: U = size F
    LEG_INVERSE = 1                     # inverse perp / future: U = -size (USD)
    LEG_OPTION = 2                      # European option, Black-76: U = size B76(F)

cdef double INV_SQRT2 = 0.70710678118654752440


cdef inline double ncdf(double x) noexcept nogil:
    """Standard normal CDF, erfc(-x / sqrt 2) / 2."""
    return 0.5 * erfc(-x * INV_SQRT2)


cdef inline double b76_usd(double f, double k, double ln_fk, double t, double sv, double df,
                           bint is_call) noexcept nogil:
    """Black-76 value per 1 base at price ``f`` with ``ln_fk = ln(f/k)``, ``sv = sigma sqrt T``,
    ``df = e^(-rT)``; intrinsic at ``t <= 0``, discounted intrinsic at ``sv <= 0``."""
    cdef double d1, d2
    if t <= 0.0:
        return fmax(f - k, 0.0) if is_call else fmax(k - f, 0.0)
    if sv <= 0.0:
        return df * (fmax(f - k, 0.0) if is_call else fmax(k - f, 0.0))
    d1 = ln_fk / sv + 0.5 * sv
    d2 = d1 - sv
    if is_call:
        return df * (f * ncdf(d1) - k * ncdf(d2))
    return df * (k * ncdf(-d2) - f * ncdf(-d1))


cdef inline double leg_value(int8_t kind, double size, double f, double k, double ln_fk, double t,
                             double sv, double df, bint is_call, bint coin) noexcept nogil:
    """One leg's value in the settle asset at price ``f`` (see the module docstring)."""
    cdef double u
    if kind == LEG_LINEAR:
        u = size * f
    elif kind == LEG_INVERSE:
        u = -size
    else:
        u = size * b76_usd(f, k, ln_fk, t, sv, df, is_call)
    return u / f if coin else u


cdef int portfolio_pass(int64_t n, const int64_t *offsets, const int8_t *coin, const int8_t *kind,
                        const double *size, const double *price, const double *strike,
                        const double *expiry, const double *sigma, const int8_t *is_call,
                        int64_t n_scen, const double *moves, const double *ln1m,
                        const double *vols, const double *weights, double rate, double short_rate,
                        double *req, int32_t *worst, double *worst_loss, double *short_min,
                        double *losses, double *ln_fk, double *sqt, double *dfs) noexcept nogil:
    """The scenario requirement of portfolios ``0..n-1``; ``losses`` NULL or n x n_scen.

    ``ln_fk``, ``sqt``, ``dfs``: scratch of one entry per leg (ln(F/K), sqrt(T), e^(-rT)).
    Loop invariant (scenario loop): ``best`` is the largest loss of scenarios ``0..s-1``
    and ``wi`` the first scenario holding it.
    """
    cdef int64_t p, i, s, lo, hi
    cdef double base, value, f, loss, best, smin, sv
    cdef bint c
    cdef int32_t wi
    for p in range(n):
        lo = offsets[p]
        hi = offsets[p + 1]
        c = coin[p] != 0
        base = 0.0
        smin = 0.0
        for i in range(lo, hi):                       # per-leg constants and the base value
            if kind[i] == LEG_OPTION:
                ln_fk[i] = log(price[i] / strike[i])
                sqt[i] = sqrt(expiry[i]) if expiry[i] > 0.0 else 0.0
                dfs[i] = exp(-rate * expiry[i]) if expiry[i] > 0.0 else 1.0
                if size[i] < 0.0:
                    smin -= size[i] * (1.0 if c else price[i])
            else:
                ln_fk[i] = 0.0
                sqt[i] = 0.0
                dfs[i] = 1.0
            base += leg_value(kind[i], size[i], price[i], strike[i], ln_fk[i], expiry[i],
                              sigma[i] * sqt[i], dfs[i], is_call[i] != 0, c)
        smin *= short_rate
        best = 0.0
        wi = -1
        for s in range(n_scen):
            value = 0.0
            for i in range(lo, hi):
                f = price[i] * (1.0 + moves[s])
                sv = sigma[i] * (1.0 + vols[s]) * sqt[i]
                value += leg_value(kind[i], size[i], f, strike[i], ln_fk[i] + ln1m[s], expiry[i],
                                   sv, dfs[i], is_call[i] != 0, c)
            loss = weights[s] * (base - value)
            if losses != NULL:
                losses[p * n_scen + s] = loss
            if wi < 0 or loss > best:
                best = loss
                wi = <int32_t>s
        if hi == lo:
            wi = -1
            best = 0.0
        worst[p] = wi
        worst_loss[p] = best
        short_min[p] = smin
        req[p] = fmax(fmax(best, smin), 0.0)
    return 0


def scenario_requirements(const int64_t[::1] offsets, const int8_t[::1] coin, const int8_t[::1] kind,
                          const double[::1] size, const double[::1] price, const double[::1] strike,
                          const double[::1] expiry_years, const double[::1] sigma,
                          const int8_t[::1] is_call, const double[::1] moves, const double[::1] vols,
                          const double[::1] weights, double rate, double short_option_min,
                          double[::1] requirement, int32_t[::1] worst, double[::1] worst_loss,
                          double[::1] short_min, double[:, ::1] losses):
    """Fill ``requirement``, ``worst``, ``worst_loss``, ``short_min`` (one per portfolio) and,
    when ``losses`` has a row per portfolio, every scenario's weighted loss. Returns 0.

    Unchecked: call engine.risk.portfolio.requirements_packed.
    """
    cdef int64_t n = coin.shape[0]
    cdef int64_t n_legs = kind.shape[0]
    cdef int64_t n_scen = moves.shape[0]
    cdef int64_t s
    cdef double *lossp = &losses[0, 0] if losses.shape[0] == n and n > 0 else NULL
    cdef double *scratch = <double *>malloc(sizeof(double) * (3 * n_legs + n_scen + 1))
    cdef int rc
    if scratch == NULL:
        raise MemoryError()
    try:
        with nogil:
            for s in range(n_scen):
                scratch[3 * n_legs + s] = log1p(moves[s])
            if n > 0:
                rc = portfolio_pass(n, &offsets[0], &coin[0], &kind[0] if n_legs else NULL,
                                    &size[0] if n_legs else NULL, &price[0] if n_legs else NULL,
                                    &strike[0] if n_legs else NULL, &expiry_years[0] if n_legs else NULL,
                                    &sigma[0] if n_legs else NULL, &is_call[0] if n_legs else NULL,
                                    n_scen, &moves[0], scratch + 3 * n_legs, &vols[0], &weights[0],
                                    rate, short_option_min, &requirement[0], &worst[0], &worst_loss[0],
                                    &short_min[0], lossp, scratch, scratch + n_legs, scratch + 2 * n_legs)
    finally:
        free(scratch)
    return 0
