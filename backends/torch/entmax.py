"""Weighted alpha-entmax rows in torch: the reference's algorithm (SPEC.md sections 2 and 4).

Rows are the last axis. eps = alpha - 1 broadcasts against the rows ([..., 1]). Two solvers
for the per-row c of p = m exp(log1p(eps (s - c)) / eps) (no cancellation near alpha = 1;
rows with eps = 0 take softmax(s + log m) instead):

- solve_rows, written without data-dependent Python branches so that it traces under
  torch.compile: Newton on log sum p, safeguarded by a bisection bracket, for a capped number
  of steps per dtype (Newton from the tight lower bracket needs far fewer than the cap). The
  stand-alone entmax op and compiled attention use it.
- solve_masked_rows, the eager tiled attention's: a closed-form lower bound rules out most
  keys, and Newton from below on sum p - 1 (convex: it never overshoots) runs on the rest
  only, compacted; see its docstring.
"""

from __future__ import annotations

import torch

from attnspec import formulas

ITERATIONS = {torch.float64: 40, torch.float32: 24}
#: The safeguarded solve's cap when it finishes what Newton from below did not (_bracketed).
BRACKETED_ITERATIONS = {torch.float64: 80, torch.float32: 48}


def _safe_eps(eps):
    return torch.where(eps > 0, eps, torch.ones_like(eps))


def log_ratio(t, eps):
    """log(p/m) = log1p(eps t)/eps (t where eps = 0); -inf where eps t <= -1."""
    return formulas.log_ratio(t, eps, torch)


def compact(candidates):
    """(index [..., K], valid [..., K]): per row, the positions of the True entries of
    candidates [..., n] in increasing order, padded (valid = False, index 0) to the largest
    count K.

    Sorting-free: nonzero() reads the boolean mask (one byte per entry) and yields the
    positions row by row; each then goes to slot (its rank within its row). On CPU this is
    several times cheaper than topk, which it replaces.
    """
    lead, n = candidates.shape[:-1], candidates.shape[-1]
    flat = candidates.reshape(-1, n)
    rows = flat.shape[0]
    where = flat.nonzero()
    row, position = where[:, 0], where[:, 1]
    counts = torch.bincount(row, minlength=rows)
    K = int(counts.max()) if rows else 0
    start = counts.cumsum(0) - counts
    slot = torch.arange(row.shape[0], device=row.device) - start[row]
    index = torch.zeros((rows, K), dtype=torch.int64, device=candidates.device)
    index[row, slot] = position
    valid = torch.arange(K, device=candidates.device) < counts[:, None]
    return index.reshape(lead + (K,)), valid.reshape(lead + (K,))


def expand(index, values, n):
    """The inverse of compaction: values [..., K] at positions index [..., K] of zeros
    [..., n]. Padding slots must hold 0: they point at position 0, and the row's first slot is
    written again last, so a padding 0 never overwrites a real value there."""
    out = values.new_zeros(values.shape[:-1] + (n,)).scatter_(-1, index, values)
    return out.scatter_(-1, index[..., :1], values[..., :1])


#: Keys per chunk in _lower_bound: each chunk's largest score stands in for the chunk.
CHUNK = 16
#: How many chunk maxima the closed-form lower bound considers (the k of _lower_bound).
BOUND_KEYS = 8


def _chunked(x, fill):
    """x [..., n] as [..., n / CHUNK, CHUNK], padded with fill."""
    pad = (-x.shape[-1]) % CHUNK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.reshape(x.shape[:-1] + (x.shape[-1] // CHUNK, CHUNK))


def _chunk_maxima(s, m):
    """(chunk_top [..., n / CHUNK], chunk_weight or None): the largest score of each CHUNK
    consecutive keys and that key's weight (m None: all ones). The row's top is their max, so
    one pass over the row gives both."""
    chunks = _chunked(s, -torch.inf)
    if m is None:
        return chunks.amax(-1), None
    chunk_top, where = chunks.max(-1)
    return chunk_top, _chunked(m.expand(s.shape), 0.0).gather(-1, where[..., None])[..., 0]


def _lower_bound(chunk_top, chunk_weight, safe):
    """A lower bound of c - top for every row, in closed form (no iteration), from the chunk
    maxima less the row's top (see _chunk_maxima).

    If k keys each have a score >= a and a weight >= w, then at c' = a + (1 - (k w)^-eps)/eps
    each of them has p = m (1 + eps (s - c'))^(1/eps) >= w (k w)^-1 = 1/k: the row sums to
    >= 1 there, so c' <= c. The keys are the chunks' top keys (distinct keys), sorted by
    score: a is the k-th largest score and w the smallest weight among those k keys; the best
    of k = 1..BOUND_KEYS is taken, and, with weights, each top key alone (k = 1 with its own
    weight: a small weight among the highest scores weakens the k-key bounds, not this one).
    A top-k over n / CHUNK maxima: an iterated bound (Newton on the chunk maxima) is tighter
    but costs more than the whole solve that follows it."""
    k = min(BOUND_KEYS, chunk_top.shape[-1])
    a, order = torch.topk(chunk_top, k, dim=-1)  # descending
    log_kw = torch.log(torch.arange(1, k + 1, dtype=chunk_top.dtype, device=chunk_top.device))
    if chunk_weight is not None:  # a -inf score (no allowed key in the chunk) may have weight 0
        weight = torch.where(torch.isfinite(a), chunk_weight.gather(-1, order), 1.0).cummin(-1).values
        log_kw = log_kw + torch.log(weight)
    bound = torch.where(torch.isfinite(a), a - torch.expm1(-safe * log_kw) / safe, -torch.inf)
    bound = bound.amax(-1, keepdim=True)
    if chunk_weight is not None:
        alone = chunk_top - torch.expm1(-safe * torch.log(chunk_weight)) / safe
        bound = torch.maximum(bound, torch.where(torch.isfinite(chunk_top), alone, -torch.inf).amax(-1, keepdim=True))
    return torch.where(torch.isfinite(bound), bound, 0.0)


def _newton_from_below(shifted, m, eps, c, iterations):
    """(c [..., 1], converged) for g(c) = sum_j m_j (1 + eps (s_j - c))_+^(1/eps) - 1 = 0,
    alpha > 1 rows, by Newton from a lower bound c. g is convex and decreasing (1/eps >= 1),
    so each step lands between c and the root: the iterates rise monotonically (each one is
    again a lower bound), no bracket or bisection is needed, and every p_j stays <= 1 (c stays
    above each key's lone-key root). Stops once no row's step exceeds a few ulps (a step <= 0
    means rounding reached the root), or after `iterations` steps. shifted holds -inf for
    padding; m None means all ones. Rows with no key keep c."""
    inv = 1 / eps
    tolerance = 4 * torch.finfo(shifted.dtype).eps
    for _ in range(iterations):
        x = ((shifted - c) * eps).clamp_min(-1.0)
        p = torch.exp(torch.log1p(x) * inv)
        if m is not None:
            p = p * m
        slope = torch.where(x > -1, p / (1 + x), 0.0).sum(-1, keepdim=True)  # -g'(c)
        step = (p.sum(-1, keepdim=True) - 1) / slope
        step = torch.where(slope > 0, step, 0.0)
        c = c + step
        if bool((step <= tolerance * (1 + c.abs())).all()):
            return c, True
    return c, False


def _bracketed(shifted, m, eps, lo):
    """c by the safeguarded log-space Newton of solve_rows (bisection when a step would leave
    the bracket), from the lower bound lo: the fallback should Newton from below run out of
    steps (for alpha = 2 it may need as many steps as the support has keys, in theory)."""
    finite = torch.isfinite(shifted)
    m = torch.where(finite, 1.0, 0.0) if m is None else torch.where(finite, m, 0.0)
    log_m = torch.where(finite, torch.log(torch.where(finite, m, 1.0)), -torch.inf)
    hi = torch.maximum(-torch.expm1(-eps * torch.log(m.sum(-1, keepdim=True))) / eps, lo)
    return _newton(shifted, log_m, eps, lo, hi, BRACKETED_ITERATIONS[shifted.dtype], True)


#: Newton steps on the first compaction before the candidates are pruned again.
PRUNE_AFTER = 2


def _margin(c, eps):
    """Slack for the test s > c - 1/eps that picks the keys able to enter the support: it must
    keep every key with 1 + eps (s - c) > 0 as computed, whatever the rounding; keys kept in
    excess just get p = 0."""
    return 16 * torch.finfo(c.dtype).eps * (1 + c.abs() + 1 / eps)


def solve_masked_rows(s, m, eps):
    """(p, c) of weighted entmax along the last axis, for the attention forward: s [..., n]
    holds -inf wherever a key is not allowed, m is 0 there (m may be an expanded view, or
    None for all ones), eps [..., 1]. Only c is kept for the backward, so no t is returned.

    Outside torch.compile, when every row has alpha > 1: a lower bound c0 of c
    (_lower_bound) rules out every key with s <= c0 - 1/eps (it can never enter the support);
    the remaining candidates are compacted to [..., K], the row is solved there by Newton
    from c0, and p is scattered back. All-softmax calls take softmax_rows; mixed calls (some
    alpha = 1) and compiled ones solve the rows in place (solve_rows)."""
    compiling = torch.compiler.is_compiling()
    if not compiling and not bool((eps > 0).any()):
        return softmax_rows(s, m)
    if not compiling and bool((eps > 0).all()):
        # Always compacted, even when K is most of n: the in-place solve is far slower even on
        # span tiles whose candidates are half the window (Newton on [..., K] from c0 needs
        # few steps; the log-space solve with bisection on [..., n] many more, each dearer).
        n = s.shape[-1]
        chunk_top, chunk_weight = _chunk_maxima(s, m)
        top = chunk_top.amax(-1, keepdim=True)
        nonempty = torch.isfinite(top)
        top = torch.where(nonempty, top, 0.0)
        safe = _safe_eps(eps)
        c0 = top + _lower_bound(chunk_top - top, chunk_weight, safe)
        index, valid = compact(s > c0 - 1 / safe - _margin(c0, safe))  # empty rows have none
        shifted = torch.where(valid, s.gather(-1, index) - top, -torch.inf)
        m_k = None if m is None else torch.where(valid, m.expand(s.shape).gather(-1, index), 0.0)
        c, converged = _newton_from_below(shifted, m_k, safe, c0 - top, PRUNE_AFTER)
        if not converged:
            # Each iterate is a tighter lower bound than c0: prune the candidates again. K is
            # the largest count over the rows, and a few rows with a loose c0 set it, far
            # above the mean count; after two steps K is close to the largest support.
            index_k, valid = compact(shifted > c - 1 / safe - _margin(c, safe))
            if index_k.shape[-1] < index.shape[-1]:
                index = index.gather(-1, index_k)
                shifted = torch.where(valid, shifted.gather(-1, index_k), -torch.inf)
                m_k = None if m_k is None else torch.where(valid, m_k.gather(-1, index_k), 0.0)
            c, converged = _newton_from_below(shifted, m_k, safe, c, ITERATIONS[s.dtype])
            if not converged:  # never seen; the bracketed solve guarantees the accuracy
                c = _bracketed(shifted, m_k, safe, c)
        finite = torch.isfinite(shifted)
        t = torch.where(finite, shifted - c, 0.0)
        p_k = torch.exp(log_ratio(t, safe))
        p_k = torch.where(finite & (1 + safe * t > 0), p_k if m_k is None else m_k * p_k, 0.0)
        return expand(index, p_k, n), torch.where(nonempty, c + top, 0.0)
    if not compiling:  # some rows alpha = 1, some > 1: each kind on its own rows
        return _solve_mixed_rows(s, m, eps)
    allowed = torch.isfinite(s)
    m = allowed.to(s.dtype) if m is None else m.expand(s.shape)
    p, _, c = solve_rows(s, m, eps, allowed, return_c=True)
    return p, c


def _solve_mixed_rows(s, m, eps):
    """solve_masked_rows for calls where alpha = 1 in some rows only (e.g. per-head alpha with
    a softmax head): the softmax rows and the others are gathered apart and each set takes its
    own fast path (solving both kinds in place at once is slower)."""
    rows = s.shape[:-1]
    softmax = (eps == 0).expand(rows + (1,))[..., 0]
    flat_m = None if m is None else m.expand(s.shape)
    p = torch.zeros_like(s)
    c = torch.zeros(rows + (1,), dtype=s.dtype, device=s.device)
    for chosen in (softmax, ~softmax):
        s_rows = s[chosen]
        m_rows = None if flat_m is None else flat_m[chosen]
        p[chosen], c[chosen] = solve_masked_rows(s_rows, m_rows, eps.expand(rows + (1,))[chosen])
    return p, c


def softmax_rows(s, m):
    """(p, c) of alpha = 1 rows: p = m exp(s - c) = softmax(s + log m), c the log-normaliser
    (0 for rows with no allowed key, which get p = 0). s holds -inf where not allowed."""
    logits = s if m is None else s + torch.log(m)
    c = torch.logsumexp(logits, -1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, 0.0)
    return torch.exp(logits - c), c


def softmax_rows_vjp(s, m, c, g, need_eps):
    """(p, ds, deps) of softmax_rows for dL/dp = g, rebuilding p from c:
    ds = p (g - sum p g); dm = ds / m (as p = m exp(s - c)); deps = -1/2 sum ds t^2 with
    t = s - c, the alpha = 1 limit of SPEC.md 4.3 (zeros unless need_eps)."""
    logits = s if m is None else s + torch.log(m)
    p = torch.exp(logits - c)
    ds = p * (g - (p * g).sum(-1, keepdim=True))
    if not need_eps:
        return p, ds, torch.zeros_like(c)
    t = s - c
    deps = -0.5 * torch.where(p > 0, ds * t * t, 0.0).sum(-1, keepdim=True)
    return p, ds, deps


def sparse_support(s, eps, c):
    """(index, valid) [..., K] of the entries that can have p > 0 for a known c
    (u = 1 + eps (s - c) > 0, i.e. s > c - 1/eps), compacted (see `compact`); None when more
    than a quarter of a row qualifies, some row has alpha = 1, or under torch.compile. Lets a
    backward pass work on [..., K] instead of [..., n]. s must be -inf where not allowed."""
    if torch.compiler.is_compiling() or not bool((eps > 0).all()):
        return None
    index, valid = compact(s > c - 1 / eps - _margin(c, eps))
    if index.shape[-1] > s.shape[-1] // 4:
        return None
    return index, valid


def solve_rows(s, m, eps, allowed, return_c=False):
    """(p, t) of weighted entmax along the last axis; s, m, allowed [..., n], eps [..., 1].

    Entries not allowed get p = 0; a row with no allowed entry gives zeros. t = s - c is the
    shift-free score (meaningful on allowed entries). return_c=True adds c [..., 1] (the
    per-row statistic from which `probabilities` rebuilds p in a backward pass).
    Outside torch.compile the Newton loop stops as soon as no row moves any more. (The
    attention forward, which keeps only c, uses solve_masked_rows and its sparse path.)
    """
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


def safeguarded_step(c, lo, hi, h, slope):
    """One safeguarded Newton step on h(c) = log sum p (decreasing, slope = h'(c)): (the next c,
    lo, hi), the bracket shrunk with the sign of h (SPEC.md 2.4; JAX's newton_update)."""
    lo = torch.where(h >= 0, c, lo)
    hi = torch.where(h <= 0, c, hi)
    newton = c - h / slope
    inside = torch.isfinite(newton) & (newton >= lo) & (newton <= hi)
    # Newton on h = log(1 + g), g(c) = sum_j m_j u_j^(1/eps) - 1, may overshoot from the left
    # (it did by far when the root sat on hi: bisection then crept to it, 2^-40 short). g is
    # convex, so Newton on g itself never overshoots from the left: take its step
    # (g / g' = (1 - exp(-h)) / h') before falling back to bisection.
    convex = c + torch.expm1(-h) / slope
    convex_inside = torch.isfinite(convex) & (convex >= lo) & (convex <= hi)
    return torch.where(inside, newton, torch.where(convex_inside, convex, (lo + hi) / 2)), lo, hi


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
        step, lo, hi = safeguarded_step(c, lo, hi, h, slope)
        c = torch.where(h == 0, c, step)
        if early_exit and bool(((c - previous).abs() <= tolerance * (1 + c.abs())).all()):
            break
    return c


def probabilities(s, m, eps, allowed, c):
    """(p, t) for a known per-row c [..., 1] (as solve_rows returns it for the same s).
    m None: all ones. allowed None: entries not allowed already hold s = -inf (p = 0 there;
    t is then -inf there too, which vjp_rows never reads off the support)."""
    t = s - c
    p = torch.exp(log_ratio(t, eps))
    if m is not None:
        p = m * p
    if allowed is None:
        return p, t
    return torch.where(allowed, p, 0.0), torch.where(allowed, t, 0.0)


def psi(t, eps):
    """d/d eps of log1p(eps t)/eps, with its series where |eps t| is small (SPEC.md 4.3)."""
    return formulas.psi(t, eps, torch, "float64" if t.dtype == torch.float64 else "float32")


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
    if x.numel() == 0:  # an empty result (SPEC.md 5.3), still on the autograd graph
        return x * 0
    return _Entmax.apply(x, alpha, weights, axis)
