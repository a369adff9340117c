"""Weighted alpha-entmax rows in torch: the reference's algorithm (SPEC.md sections 2 and 4),
written without data-dependent Python branches so that it traces under torch.compile.

Rows are the last axis. eps = alpha - 1 broadcasts against the rows ([..., 1]). Every row is
solved by Newton on c, safeguarded by a bisection bracket, in the parametrisation
p = m exp(log1p(eps (s - c)) / eps) (no cancellation near alpha = 1); rows with eps = 0 take
softmax(s + log m) instead. The iteration count is fixed per dtype (enough for convergence:
Newton from the tight lower bracket converged in <= 9 steps on every row we measured, and the
bisection safeguard halves the bracket whenever Newton would leave it).
"""

from __future__ import annotations

import torch

ITERATIONS = {torch.float64: 40, torch.float32: 24}
# psi(eps, t) switches to its series below |eps t| < threshold (SPEC.md section 4.3).
SERIES = {torch.float64: (1e-2, 12), torch.float32: (0.3, 16)}


def _safe_eps(eps):
    return torch.where(eps > 0, eps, torch.ones_like(eps))


def log_ratio(t, eps):
    """log(p/m) = log1p(eps t)/eps (t where eps = 0); -inf where eps t <= -1."""
    safe = _safe_eps(eps)
    x = eps * t
    inside = x > -1
    value = torch.log1p(torch.where(inside, x, 0.0)) / safe
    value = torch.where(eps > 0, value, t)
    return torch.where(inside | (eps == 0), value, -torch.inf)


#: Keys per row solved first, in _solve_sparse, to get a tight lower bracket.
FIRST_KEYS = 32


def _solve_on(shifted, m, safe, lo, iterations):
    """c solving h(c) = 0 over the given (gathered) keys, from a valid lower bracket lo."""
    finite = torch.isfinite(shifted)
    log_m = torch.where(finite, torch.log(torch.where(finite, m, 1.0)), -torch.inf)
    mass = torch.where(finite, m, 0.0).sum(-1, keepdim=True)
    hi = torch.maximum(-torch.expm1(-safe * torch.log(mass)) / safe, lo)
    return _newton(shifted, log_m, safe, lo, hi, iterations, True)


def _solve_sparse(s, m, eps, allowed):
    """(p, c) or None: the eager fast path for rows that all have alpha > 1 and sparse supports.

    Adding keys only raises h, so the c that solves the problem restricted to any subset of a
    row's keys is a lower bracket of the true c, and keys with u = 1 + eps (s - c) <= 0 there
    can never enter the support. We solve on the FIRST_KEYS best-scoring keys (cheap, usually
    already exact), keep the keys above the resulting threshold, and if there are more of them
    solve again on those. Everything after the two gathers works on [..., K]; p is scattered
    back. None when more than a quarter of a row could be in the support (dense rows).
    """
    n = s.shape[-1]
    masked = torch.where(allowed, s, -torch.inf)
    R = min(n, FIRST_KEYS)
    first, index = torch.topk(masked, R, dim=-1)
    top = first[..., :1]
    nonempty = torch.isfinite(top)
    top = torch.where(nonempty, top, 0.0)
    safe = _safe_eps(eps)
    shifted = first - top
    m_first = m.gather(-1, index)
    lo = torch.where(nonempty, -torch.expm1(-safe * torch.log(torch.where(nonempty, m_first[..., :1], 1.0))) / safe, 0.0)
    iterations = ITERATIONS[s.dtype]
    c = torch.where(nonempty, _solve_on(shifted, m_first, safe, lo, iterations), 0.0)
    count = (masked - top > c - 1 / safe).sum(-1, keepdim=True)
    K = int(count.max()) if count.numel() else 0
    if K > n // 4:
        return None
    if K > R:  # more keys may enter: solve on all of them, from the bracket we have
        shifted, index = torch.topk(masked, K, dim=-1)
        shifted = shifted - top
        m_first = m.gather(-1, index)
        c = torch.where(nonempty, _solve_on(shifted, m_first, safe, c, iterations), 0.0)
    finite = torch.isfinite(shifted)
    p_k = torch.where(finite, m_first * torch.exp(log_ratio(torch.where(finite, shifted - c, 0.0), safe)), 0.0)
    p_k = torch.where(finite & (1 + safe * (shifted - c) > 0), p_k, 0.0)
    p = torch.zeros_like(s).scatter_(-1, index, p_k)
    return torch.where(nonempty, p, 0.0), c + top


def sparse_support(s, eps, allowed, c):
    """index [..., K] of the entries that can have p > 0 for a known c (u = 1 + eps (s - c) > 0),
    padded with other entries; None when more than a quarter of a row qualifies, some row has
    alpha = 1, or under torch.compile. Lets a backward pass work on [..., K] instead of [..., n]."""
    if torch.compiler.is_compiling() or not bool((eps > 0).all()):
        return None
    candidates = allowed & (1 + eps * (s - c) > 0)
    K = int(candidates.sum(-1).max()) if candidates.numel() else 0
    if K > s.shape[-1] // 4:
        return None
    return torch.topk(torch.where(candidates, s, -torch.inf), max(K, 1), dim=-1).indices


def solve_rows(s, m, eps, allowed, return_c=False, need_t=True):
    """(p, t) of weighted entmax along the last axis; s, m, allowed [..., n], eps [..., 1].

    Entries not allowed get p = 0; a row with no allowed entry gives zeros. t = s - c is the
    shift-free score (meaningful on allowed entries). return_c=True adds c [..., 1] (the
    per-row statistic from which `probabilities` rebuilds p in a backward pass).
    Outside torch.compile the Newton loop stops as soon as no row moves any more, and callers
    that need no t (need_t=False, return_c=True: a forward pass that keeps c) may get the
    sparse path; t is then None.
    """
    if return_c and not need_t and not torch.compiler.is_compiling() and bool((eps > 0).all()):
        solved = _solve_sparse(s, m, eps, allowed)
        if solved is not None:
            return solved[0], None, solved[1]
    neg_inf = -torch.inf
    top = torch.where(allowed, s, neg_inf).amax(-1, keepdim=True)
    nonempty = torch.isfinite(top)
    top = torch.where(nonempty, top, torch.zeros_like(top))
    shifted = torch.where(allowed, s - top, neg_inf)
    log_m = torch.where(allowed, torch.log(torch.where(allowed, m, 1.0)), neg_inf)
    if not torch.compiler.is_compiling() and not bool((eps > 0).any()):  # softmax only
        c = torch.where(nonempty, torch.logsumexp(shifted + log_m, -1, keepdim=True), 0.0)
        p, t = probabilities(shifted, m, eps, allowed, c)
        p = torch.where(nonempty, p, 0.0)
        return (p, t, c + top) if return_c else (p, t)

    # alpha = 1 rows: softmax(s + log m), c its log-normaliser (skipped when no row has alpha 1).
    if torch.compiler.is_compiling() or bool((eps == 0).any()):
        c_soft = torch.logsumexp(shifted + log_m, -1, keepdim=True)
        c_soft = torch.where(nonempty, c_soft, 0.0)
    else:
        c_soft = torch.zeros_like(top)

    # alpha > 1 rows: Newton on h(c) = log sum_j m_j exp(log1p(eps (s_j - c)) / eps).
    safe = _safe_eps(eps)
    one_alone = torch.where(allowed, shifted - torch.expm1(-safe * log_m) / safe, neg_inf)
    lo = one_alone.amax(-1, keepdim=True)
    mass = torch.where(allowed, m, 0.0).sum(-1, keepdim=True)
    hi = -torch.expm1(-safe * torch.log(mass)) / safe
    lo = torch.where(nonempty, lo, torch.zeros_like(lo))
    hi = torch.where(nonempty, torch.maximum(hi, lo), torch.zeros_like(hi))
    early_exit = not torch.compiler.is_compiling()
    # Softmax-only calls (every alpha = 1) need no Newton step at all.
    iterations = ITERATIONS[s.dtype] if not early_exit or bool((eps > 0).any()) else 0
    if iterations and early_exit:
        # Every iterate stays >= lo, where entries with u = 1 + eps (s - lo) <= 0 already have
        # p = 0, so only the top-K scores of each row can matter: iterate on those alone.
        candidates = allowed & (shifted - lo > -1 / safe)
        K = int(candidates.sum(-1).max()) if candidates.numel() else 0
        if 0 < K <= s.shape[-1] // 4:
            top_scores, index = torch.topk(torch.where(candidates, shifted, neg_inf), K, dim=-1)
            c = _newton(top_scores, log_m.gather(-1, index), safe, lo, hi, iterations, early_exit)
        else:
            c = _newton(shifted, log_m, safe, lo, hi, iterations, early_exit)
    else:
        c = _newton(shifted, log_m, safe, lo, hi, iterations, early_exit)
    c = torch.where(eps > 0, c, c_soft)
    p, t = probabilities(shifted, m, eps, allowed, c)
    p = torch.where(nonempty, p, 0.0)
    if return_c:
        return p, t, c + top
    return p, t


def _newton(shifted, log_m, eps, lo, hi, iterations, early_exit):
    """c [..., 1] with h(c) = 0, from c = lo, Newton steps that stay inside [lo, hi] (else
    bisection), `iterations` at most; early_exit stops once no row moves by more than ulps."""
    c = lo
    tolerance = 4 * torch.finfo(shifted.dtype).eps
    for _ in range(iterations):
        previous = c
        t = shifted - c
        terms = log_m + log_ratio(t, eps)
        h = torch.logsumexp(terms, -1, keepdim=True)
        weights = torch.where(torch.isfinite(terms), torch.exp(terms - h) / (1 + eps * t), 0.0)
        slope = -weights.sum(-1, keepdim=True)
        lo = torch.where(h >= 0, c, lo)
        hi = torch.where(h <= 0, c, hi)
        newton = c - h / slope
        inside = torch.isfinite(newton) & (newton >= lo) & (newton <= hi)
        c = torch.where(h == 0, c, torch.where(inside, newton, (lo + hi) / 2))
        if early_exit and bool(((c - previous).abs() <= tolerance * (1 + c.abs())).all()):
            break
    return c


def probabilities(s, m, eps, allowed, c):
    """(p, t) for a known per-row c [..., 1] (as solve_rows returns it for the same s)."""
    t = s - c
    p = torch.where(allowed, m * torch.exp(log_ratio(t, eps)), 0.0)
    return p, torch.where(allowed, t, 0.0)


def psi(t, eps):
    """d/d eps of log1p(eps t)/eps, with its series where |eps t| is small (SPEC.md 4.3)."""
    threshold, terms = SERIES.get(t.dtype, SERIES[torch.float32])
    x = eps * t
    small = x.abs() < threshold
    xs = torch.where(small, x, torch.zeros_like(x))
    series = torch.zeros_like(x)
    for k in range(terms + 1, 1, -1):
        series = series * xs + ((-1.0) ** (k + 1)) * (k - 1) / k
    series = series * t * t
    safe = _safe_eps(eps)
    xd = torch.where(small, torch.zeros_like(x), x)
    direct = (xd / (1 + xd) - torch.log1p(xd)) / (safe * safe)
    return torch.where(small, series, direct)


def vjp_rows(p, t, eps, g, need_eps=True):
    """(ds, dm, deps per row [..., 1]) for dL/dp = g; see SPEC.md section 4. need_eps=False
    skips deps (zeros): alpha asks for no gradient, and psi is the costliest part."""
    support = p > 0
    zero = torch.zeros_like(p)
    u = torch.where(support, 1 + eps * t, torch.ones_like(p))
    w = torch.where(support, p / u, zero)
    g = torch.where(support, g, zero)
    total = w.sum(-1, keepdim=True)
    gbar = (w * g).sum(-1, keepdim=True) / torch.where(total > 0, total, torch.ones_like(total))
    centred = torch.where(support, g - gbar, zero)
    ds = w * centred
    dm = torch.where(support, torch.exp(log_ratio(t, eps)) * centred, zero)
    if not need_eps:
        return ds, dm, torch.zeros_like(total)
    deps = (centred * torch.where(support, p * psi(t, eps), zero)).sum(-1, keepdim=True)
    return ds, dm, deps


# ----------------------------------------------------------------------------------------------
# The stand-alone op: attnspec.entmax(x, alpha, axis, weights) for torch tensors.


def _rows(x, alpha, axis, weights):
    """x, alpha and weights as rows along the last axis, in the compute dtype:
    s, m [..., n] and eps [..., 1] (the reference's `_rows`, without flattening)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = x.to(dtype).movedim(axis, -1)
    alpha = torch.as_tensor(alpha, dtype=dtype, device=x.device).to(dtype)
    alpha = alpha.reshape((1,) * (x.dim() - alpha.dim()) + tuple(alpha.shape))  # x's rank
    eps = alpha.movedim(axis, -1).expand(s.shape[:-1] + (1,)) - 1.0
    m = torch.ones_like(s) if weights is None else weights.to(dtype).expand(x.shape).movedim(axis, -1)
    return s, m, eps


def _rescale_heavy_weights(s, m):
    """Rows whose largest allowed weight lam exceeds 1 are solved as p(lam^eps s, m / lam)
    (SPEC.md section 2.5). Returns (s', m', log_lam [..., 1]; 0 where unchanged)."""
    allowed = (m > 0) & (s > -torch.inf)
    lam = torch.where(allowed, m, 0.0).amax(-1, keepdim=True)
    heavy = lam > 1
    log_lam = torch.where(heavy, torch.log(torch.where(heavy, lam, 1.0)), 0.0)
    return log_lam, heavy, lam


def _entmax_forward(s, m, eps):
    """(p, t, log_lam) of the rows, the heavy-weight rescaling and the poisoned rows included."""
    log_lam, heavy, lam = _rescale_heavy_weights(s, m)
    factor = torch.exp(eps * log_lam)
    s = torch.where(heavy, s * factor, s)
    m = torch.where(heavy, m / torch.where(heavy, lam, 1.0), m)
    allowed = (m > 0) & torch.isfinite(s)
    p, t = solve_rows(s, m, eps, allowed)
    # An allowed entry that is NaN or +inf makes the row undefined (SPEC.md section 2.1).
    poisoned = ((m > 0) & (torch.isnan(s) | (s == torch.inf))).any(-1, keepdim=True)
    p = torch.where(poisoned, torch.nan, p)
    return p, t, s, log_lam


class _Entmax(torch.autograd.Function):
    """Forward: solve the rows. Backward: SPEC.md section 4 through the rescaling
    s' = lam^eps s, m' = m / lam (lam held fixed: the identity holds for every lam)."""

    @staticmethod
    def forward(ctx, x, alpha, weights, axis):
        s, m, eps = _rows(x, alpha, axis, weights)
        p, t, s_scaled, log_lam = _entmax_forward(s, m, eps)
        ctx.save_for_backward(p, t, s_scaled, eps, log_lam)
        ctx.axis = axis
        ctx.x_dtype = x.dtype
        ctx.alpha_meta = (alpha.dtype, alpha.shape) if isinstance(alpha, torch.Tensor) else None
        ctx.weights_meta = (weights.dtype, weights.shape) if isinstance(weights, torch.Tensor) else None
        return p.movedim(-1, axis).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_p):
        p, t, s_scaled, eps, log_lam = ctx.saved_tensors
        axis = ctx.axis
        g = grad_p.to(p.dtype).movedim(axis, -1)
        need_alpha = ctx.needs_input_grad[1]
        ds, dm, deps = vjp_rows(p, t, eps, g, need_eps=need_alpha)
        dx = dalpha = dweights = None
        if need_alpha:
            deps = deps + log_lam * (ds * torch.where(ds != 0, s_scaled, 0.0)).sum(-1, keepdim=True)
            dtype, shape = ctx.alpha_meta
            dalpha = deps.movedim(-1, axis).sum_to_size(shape).to(dtype)
        if ctx.needs_input_grad[0]:
            dx = (ds * torch.exp(eps * log_lam)).movedim(-1, axis).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            dtype, shape = ctx.weights_meta
            dweights = (dm / torch.exp(log_lam)).movedim(-1, axis).sum_to_size(shape).to(dtype)
        return dx, dalpha, dweights, None


def entmax(x, alpha, axis=-1, weights=None):
    """Weighted alpha-entmax of a torch tensor along `axis` (SPEC.md section 2), in x's dtype
    (halves compute in float32), differentiable in x, alpha and weights. Arguments are
    validated by the dispatcher."""
    axis = axis % x.dim()
    return _Entmax.apply(x, alpha, weights, axis)
