"""Independent oracles for the reference's tests: each computes the same thing another way.

- `entmax_mp`: weighted entmax of one row by bisection in 60-digit arithmetic (mpmath), in the
  textbook tau-parametrisation, so it shares no code or formula with the reference's solver.
- `sparsemax_row`: unweighted sparsemax by the sort-and-threshold loop of Martins & Astudillo
  (2016), one row at a time in plain Python.
- `softmax_attention`: alpha = 1 attention as the adaptive-span paper writes it,
  softmax(s + log m) with the mask applied by -inf.
"""

import math

import mpmath
import numpy as np

mpmath.mp.dps = 60


def entmax_mp(x, alpha, weights=None, iterations=400):
    """p_j = w_j [(a-1) x_j - tau]_+^(1/(a-1)) with sum 1, as mpmath numbers; -inf / weight 0
    entries get 0; alpha = 1 gives softmax(x + log w)."""
    n = len(x)
    w = [1.0] * n if weights is None else list(weights)
    keep = [j for j in range(n) if w[j] > 0 and x[j] > -math.inf]
    p = [mpmath.mpf(0)] * n
    if not keep:
        return p
    a = mpmath.mpf(alpha)
    xs = {j: mpmath.mpf(float(x[j])) for j in keep}
    ws = {j: mpmath.mpf(float(w[j])) for j in keep}
    if a == 1:
        top = max(xs.values())
        z = sum(ws[j] * mpmath.exp(xs[j] - top) for j in keep)
        for j in keep:
            p[j] = ws[j] * mpmath.exp(xs[j] - top) / z
        return p
    eps = a - 1

    def mass(tau):
        return sum(ws[j] * max(eps * xs[j] - tau, 0) ** (1 / eps) for j in keep)

    top = max(eps * xs[j] for j in keep)
    lo = top - max(ws[j] for j in keep) ** (-eps) * 2 - 1  # mass(lo) >= 1
    while mass(lo) < 1:
        lo = 2 * lo - top
    hi = top
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if mass(mid) > 1:
            lo = mid
        else:
            hi = mid
    tau = (lo + hi) / 2
    for j in keep:
        p[j] = ws[j] * max(eps * xs[j] - tau, 0) ** (1 / eps)
    return p


def sparsemax_row(x):
    z = sorted(x, reverse=True)
    cumulative, k_star, tau = 0.0, 0, 0.0
    for k, zk in enumerate(z, start=1):
        cumulative += zk
        if 1 + k * zk > cumulative:
            k_star, tau = k, (cumulative - 1) / k
    return np.maximum(np.asarray(x, dtype=np.float64) - tau, 0.0)


def softmax_attention(q, k, v, m, allowed, scale):
    """q [B,H,Lq,D], k/v already per query head [B,H,Lk,*]; m, allowed [B,H,Lq,Lk]."""
    s = scale * np.einsum("bhid,bhjd->bhij", q, k)
    with np.errstate(divide="ignore"):
        logits = np.where(allowed, s + np.log(m), -np.inf)
    top = logits.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(logits - top)
    total = e.sum(-1, keepdims=True)
    p = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
    return np.einsum("bhij,bhjd->bhid", p, v)
