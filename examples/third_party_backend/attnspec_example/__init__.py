"""An example third-party backend for NumPy arrays: a tiled kernel with shape constraints.

It does what a FlashAttention-style kernel does, in NumPy: keys and values are read in tiles of
TILE keys, the score matrix of a row is never held whole. For alpha = 1 one pass merges the
tiles online (running max, rescaled sums). For alpha > 1 the threshold of the row is solved
across tiles: each Newton step is one pass over the key tiles, and a last pass forms the
output. It takes head dims 16..128 only and says so in its Capabilities, as most GPU kernels
do, so the conformance suite draws only those.

Set ATTNSPEC_EXAMPLE_BUG to plant a bug and watch the suite catch it:
  scale      the softmax scale is ignored;
  last-tile  a partial last key tile is dropped (only lengths that are not a multiple of
             TILE show it: what the suite's tile-crossing sizes are for).
"""

import os

import numpy as np

import attnspec
from attnspec import Backend, Capabilities, Kernel

TILE = 32  # keys per tile
HEAD_DIMS = range(16, 129)  # D and Dv this kernel takes


def _tiles(Lk):
    stop = Lk
    if os.environ.get("ATTNSPEC_EXAMPLE_BUG") == "last-tile" and Lk % TILE and Lk > TILE:
        stop = Lk - Lk % TILE
    return [(j, min(j + TILE, stop)) for j in range(0, stop, TILE)]


def attention(q, k, v, *, alpha, span, ramp, causal, key_lengths, q_offset, scale):
    if span is not None:  # not declared: the dispatcher never sends it
        raise NotImplementedError("span")
    dtype = q.dtype
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    k = np.repeat(k, H // Hkv, axis=1)  # head h reads kv head h // (H / Hkv)
    v = np.repeat(v, H // Hkv, axis=1)
    if os.environ.get("ATTNSPEC_EXAMPLE_BUG") == "scale":
        scale = 1.0
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    eps = np.broadcast_to(np.asarray(alpha, dtype=np.float64) - 1.0, (H,))[None, :, None]  # [1, H, 1]
    lengths = np.full(B, Lk) if key_lengths is None else np.asarray(key_lengths).reshape(B)
    offset = np.broadcast_to(np.asarray(Lk - Lq if q_offset is None else q_offset), (B,)).astype(np.int64)
    tiles = _tiles(Lk)

    def scores(j0, j1):
        """[B, H, Lq, j1 - j0] scores of one key tile, -inf where a key is not allowed."""
        keys = np.arange(j0, j1)
        allowed = keys[None, None, :] < lengths[:, None, None]  # [B, 1, tile]
        if causal:
            position = np.arange(Lq)[None, :, None] + offset[:, None, None]  # [B, Lq, 1]
            allowed = allowed & (position - keys[None, None, :] >= 0)
        with np.errstate(invalid="ignore", over="ignore"):
            s = scale * np.einsum("bhid,bhjd->bhij", q, k[:, :, j0:j1])
        return np.where(allowed[:, None], s, -np.inf)

    def values(j0, j1):
        # Keys beyond key_lengths may hold NaN or Inf: p is 0 there, and 0 * inf must not be NaN.
        valid = np.arange(j0, j1)[None, :] < lengths[:, None]
        return np.where(valid[:, None, :, None], v[:, :, j0:j1], 0.0)

    # Pass 1: the top score of each row (the online softmax keeps its sums relative to it).
    top = np.full((B, H, Lq), -np.inf)
    out = np.zeros((B, H, Lq, Dv))
    total = np.zeros((B, H, Lq))
    softmax = np.broadcast_to(eps == 0.0, (B, H, Lq))
    for j0, j1 in tiles:
        s = scores(j0, j1)
        new_top = np.maximum(top, s.max(-1))
        # Online merge for alpha = 1: rescale what was summed when a later tile raises the max.
        with np.errstate(invalid="ignore"):
            rescale = np.where(np.isfinite(new_top), np.exp(top - new_top), 0.0)
            e = np.where(np.isfinite(new_top)[..., None], np.exp(s - new_top[..., None]), 0.0)
        out = out * rescale[..., None] + np.einsum("bhij,bhjd->bhid", e, values(j0, j1))
        total = total * rescale + e.sum(-1)
        top = new_top
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where((total > 0)[..., None], out / np.where(total > 0, total, 1.0)[..., None], 0.0)
    if np.all(softmax):
        return out.astype(dtype)

    # alpha > 1: p_j = exp(log1p(eps t_j) / eps) with t_j = s_j - c, c such that sum_j p_j = 1
    # (SPEC.md section 2.2, shift-free). f(c) = sum_j p_j is convex and decreasing in c, and
    # f(top) >= 1, so Newton steps from c = top approach the root from below without
    # overshooting. Each step is one pass over the key tiles.
    e_ = np.where(eps > 0.0, eps, 1.0)
    shift = np.where(np.isfinite(top), top, 0.0)

    def sums(c):
        f, df = np.zeros_like(c), np.zeros_like(c)
        for j0, j1 in tiles:
            t = scores(j0, j1) - (shift + c)[..., None]
            x = e_[..., None] * t
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                inside = x > -1.0
                p = np.where(inside, np.exp(np.log1p(np.where(inside, x, 0.0)) / e_[..., None]), 0.0)
                f += p.sum(-1)
                df += np.where(inside, p / (1.0 + np.where(inside, x, 0.0)), 0.0).sum(-1)
        return f, df

    c = np.zeros((B, H, Lq))
    for _ in range(100):
        f, df = sums(c)
        with np.errstate(invalid="ignore", divide="ignore"):
            step = np.where(df > 0, (f - 1.0) / df, 0.0)
        step = np.where(softmax, 0.0, np.maximum(step, 0.0))
        c = c + step
        if np.all(step <= 4 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(c))):
            break
    # Last pass: the output, normalised by the sum the kernel computed (1 up to the solve).
    acc, mass = np.zeros((B, H, Lq, Dv)), np.zeros((B, H, Lq))
    for j0, j1 in tiles:
        x = e_[..., None] * (scores(j0, j1) - (shift + c)[..., None])
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            inside = x > -1.0
            p = np.where(inside, np.exp(np.log1p(np.where(inside, x, 0.0)) / e_[..., None]), 0.0)
        acc += np.einsum("bhij,bhjd->bhid", p, values(j0, j1))
        mass += p.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        entmax_out = np.where((mass > 0)[..., None], acc / np.where(mass > 0, mass, 1.0)[..., None], 0.0)
    return np.where(softmax[..., None], out, entmax_out).astype(dtype)


def attention_vjp(q, k, v, grad_out, **kwargs):
    # NumPy has no autograd, so a NumPy kernel declares its vector-Jacobian product (here the
    # reference's: this example's subject is the tiled forward pass).
    return attnspec.reference.attention_vjp(q, k, v, grad_out, **kwargs)


def backend():
    capabilities = Capabilities(
        array_type="numpy",
        devices=("cpu",),
        dtypes=("float32", "float64"),
        # No span support: the suite checks that such calls are refused, not computed.
        features=frozenset({"entmax", "alpha_per_head", "causal", "key_lengths", "q_offset", "gqa"}),
        head_dims=HEAD_DIMS,  # D and Dv in 16..128: the suite draws only these
    )
    return Backend(
        name="examplekernel",
        version="0.2.0 (numpy " + np.__version__ + ")",
        kernels={"attention": Kernel("attention", attention, capabilities, vjp=attention_vjp)},
        priority=-1,  # never preferred over the reference for automatic selection
    )
