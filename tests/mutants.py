"""Deliberately broken backends, derived from the reference, that the suite must catch.

Each mutant is a NumPy backend whose attention (and VJP) is the reference with one planted bug,
either by changing its arguments or by swapping one internal function for the duration of the
call. `MUTANTS` maps a name to its Backend.
"""

import contextlib
import importlib
from unittest import mock

import numpy as np

from attnspec import Backend, Capabilities, Kernel, reference
from attnspec.dispatch.capabilities import all_features

# The modules, not the functions of the same name that attnspec.reference exports.
ref_entmax = importlib.import_module("attnspec.reference.entmax")
_solve_rows = ref_entmax.solve_rows
_vjp_rows = ref_entmax.vjp_rows
ref_span = importlib.import_module("attnspec.reference.span")


def _backend(name, attention_fn, vjp_fn, entmax_fn=None, entmax_vjp_fn=None):
    caps = lambda op: Capabilities(array_type="numpy", dtypes=("float16", "float32", "float64"),  # noqa: E731
                                   features=all_features(op))
    kernels = {"attention": Kernel("attention", attention_fn, caps("attention"), vjp=vjp_fn)}
    if entmax_fn is not None:
        kernels["entmax"] = Kernel("entmax", entmax_fn, caps("entmax"), vjp=entmax_vjp_fn)
    return Backend(name=name, version="mutant", kernels=kernels, priority=-100, automatic=False)


def _with_arguments(change):
    """A mutant that calls the reference with some arguments changed."""
    def forward(q, k, v, **kw):
        q2, k2, v2, kw2 = change(q, k, v, kw)
        return reference.attention(q2, k2, v2, **kw2)

    def vjp(q, k, v, grad_out, **kw):
        q2, k2, v2, kw2 = change(q, k, v, kw)
        return reference.attention_vjp(q2, k2, v2, grad_out, **kw2)

    return forward, vjp


def _with_patch(target, name, replacement):
    """A mutant that runs the reference with one internal function replaced."""
    @contextlib.contextmanager
    def patched():
        with mock.patch.object(target, name, replacement):
            yield

    def attention(q, k, v, **kw):
        with patched():
            return reference.attention(q, k, v, **kw)

    def vjp(q, k, v, grad_out, **kw):
        with patched():
            return reference.attention_vjp(q, k, v, grad_out, **kw)

    def entmax(x, alpha, axis=-1, weights=None):
        with patched():
            return reference.entmax(x, alpha, axis=axis, weights=weights)

    def entmax_vjp(x, alpha, grad, axis=-1, weights=None):
        with patched():
            return reference.entmax_vjp(x, alpha, grad, axis=axis, weights=weights)

    return attention, vjp, entmax, entmax_vjp


# --- argument mutants -------------------------------------------------------------------------

def _span_off_by_one(q, k, v, kw):
    if kw.get("span") is not None:
        kw = dict(kw, span=np.asarray(kw["span"]) + 1.0)
    return q, k, v, kw


def _ramp_scaled(q, k, v, kw):
    return q, k, v, dict(kw, ramp=2.0 * kw.get("ramp", 32.0))


def _q_offset_ignored(q, k, v, kw):
    return q, k, v, dict(kw, q_offset=None)


def _key_lengths_off_by_one(q, k, v, kw):
    if kw.get("key_lengths") is not None:
        kw = dict(kw, key_lengths=np.maximum(np.asarray(kw["key_lengths"]) - 1, 0))
    return q, k, v, kw


def _scale_ignored(q, k, v, kw):
    return q, k, v, dict(kw, scale=1.0)


def _float16_accumulation(q, k, v, kw):
    return q.astype(np.float16).astype(q.dtype), k.astype(np.float16).astype(k.dtype), \
        v.astype(np.float16).astype(v.dtype), kw


def _gqa_modulo(q, k, v, kw):
    """Head h reads kv head h % Hkv instead of h // (H / Hkv)."""
    H, Hkv = q.shape[1], k.shape[1]
    heads = np.arange(H) % Hkv
    return q, k[:, heads], v[:, heads], kw


def _gqa_modulo_vjp(q, k, v, grad_out, **kw):
    H, Hkv = q.shape[1], k.shape[1]
    heads = np.arange(H) % Hkv
    g = reference.attention_vjp(q, k[:, heads], v[:, heads], grad_out, **kw)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    np.add.at(dk, (slice(None), heads), g.dk)
    np.add.at(dv, (slice(None), heads), g.dv)
    return g._replace(dk=dk, dv=dv)


# --- internal mutants -------------------------------------------------------------------------

def _under_iterated_solve(s, m, eps):
    """tau by 8 bisection steps on the textbook form, then p divided by its sum."""
    sol = _solve_rows(s, m, eps)
    eps = np.asarray(eps, dtype=np.float64).reshape(-1, 1)
    general = ((eps > 0) & (eps < 1) & (eps != 0.5))[:, 0]
    if not general.any():
        return sol
    allowed = (m > 0) & np.isfinite(s)
    x = np.where(allowed, eps * s, -np.inf)[general]
    mm, e = m[general], eps[general]
    top = np.max(x, -1, keepdims=True)
    lo, hi = top - 1.0, top
    for _ in range(8):
        mid = (lo + hi) / 2
        with np.errstate(invalid="ignore"):
            mass = np.sum(mm * np.maximum(x - mid, 0) ** (1 / e), -1, keepdims=True)
        lo, hi = np.where(mass > 1, mid, lo), np.where(mass > 1, hi, mid)
    with np.errstate(invalid="ignore"):
        p = mm * np.maximum(x - (lo + hi) / 2, 0) ** (1 / e)
    sol.p[general] = p / p.sum(-1, keepdims=True)
    return sol


def _entmax_then_reweight(s, m, eps):
    """The forbidden form: plain entmax over the allowed keys, then p' = m p / sum(m p)."""
    plain = _solve_rows(s, (m > 0).astype(np.float64), eps)
    weighted = m * plain.p
    total = weighted.sum(-1, keepdims=True)
    sol = _solve_rows(s, m, eps)
    sol.p = np.where(total > 0, weighted / np.where(total > 0, total, 1), 0.0)
    return sol


def _empty_rows_nan(s, m, eps):
    sol = _solve_rows(s, m, eps)
    empty = ~((m > 0) & np.isfinite(s)).any(-1)
    sol.p[empty] = np.nan
    return sol


def _dalpha_not_centred(sol, g):
    """The alpha gradient without its gbar term: sum_j g_j p_j psi_j."""
    ds, dm, _ = _vjp_rows(sol, g)
    support = sol.p > 0
    p_psi = np.where(support, sol.p * ref_entmax._psi(sol.t, sol.eps), 0.0)
    return ds, dm, np.sum(np.where(support, g, 0.0) * p_psi, -1)


def _dalpha_textbook(sol, g):
    """Correia et al.'s formula evaluated as written: cancels catastrophically near alpha = 1."""
    ds, dm, _ = _vjp_rows(sol, g)
    support = sol.p > 0
    w = np.where(support, sol.p / sol.u, 0.0)
    g = np.where(support, g, 0.0)
    gbar = np.sum(w * g, -1, keepdims=True) / np.maximum(np.sum(w, -1, keepdims=True), 1e-300)
    eps = sol.eps
    with np.errstate(divide="ignore", invalid="ignore"):
        term = 1.0 / eps**2 - sol.log_ratio / eps
        return ds, dm, np.sum(np.where(support, (g - gbar) * sol.p * term, 0.0), -1)


def _zero_pow_zero(sol, g):
    """w = m^(a-1) p^(2-a) evaluated off the support too (with m = 1 there): at alpha = 2,
    0**0 = 1 gives entries with p = 0 a weight, and the score gradient leaks to them."""
    support = sol.p > 0
    w = np.where(support, sol.p / sol.u, sol.p ** (1 - sol.eps))
    gbar = np.sum(w * g, -1, keepdims=True) / np.maximum(np.sum(w, -1, keepdims=True), 1e-300)
    _, dm, deps = _vjp_rows(sol, g)
    return w * (g - gbar), dm, deps


def _mask_rounding_r_plus_z_first():
    """m = ((R + z) - |d|) / R in the compute dtype (float32 below float64): R + z rounds first,
    and near the outer kink the subtraction exposes that rounding (SPEC.md section 3)."""
    def patched(q):
        compute = np.float64 if np.asarray(q).dtype == np.float64 else np.float32

        def soft_mask(d, span, ramp):
            z = np.asarray(span, dtype=compute)[..., None, None]
            R = compute(ramp)
            return np.clip(((R + z) - np.abs(d).astype(compute)) / R, 0, 1).astype(np.float64)

        return mock.patch.object(ref_span, "soft_mask", soft_mask)

    def attention(q, k, v, **kw):
        with patched(q):
            return reference.attention(q, k, v, **kw)

    def vjp(q, k, v, grad_out, **kw):
        with patched(q):
            return reference.attention_vjp(q, k, v, grad_out, **kw)

    return attention, vjp


def _dspan_doubled(q, k, v, grad_out, **kw):
    g = reference.attention_vjp(q, k, v, grad_out, **kw)
    return g if g.dspan is None else g._replace(dspan=2 * g.dspan)


def _make():
    mutants = {}
    for name, change in [
        ("span off by one", _span_off_by_one),
        ("ramp scaled", _ramp_scaled),
        ("q_offset ignored", _q_offset_ignored),
        ("key_lengths off by one", _key_lengths_off_by_one),
        ("scale ignored", _scale_ignored),
        ("float16 accumulation", _float16_accumulation),
    ]:
        mutants[name] = _backend(name, *_with_arguments(change))
    fwd, _ = _with_arguments(_gqa_modulo)
    mutants["gqa head map h % Hkv"] = _backend("gqa head map h % Hkv", fwd, _gqa_modulo_vjp)
    mutants["dspan doubled"] = _backend("dspan doubled", reference.attention, _dspan_doubled)
    mutants["mask (R + z) - |d|"] = _backend("mask (R + z) - |d|", *_mask_rounding_r_plus_z_first())
    for name, target, attr, replacement in [
        ("tau under-iterated", ref_entmax, "solve_rows", _under_iterated_solve),
        ("entmax then re-weight", ref_entmax, "solve_rows", _entmax_then_reweight),
        ("empty rows NaN", ref_entmax, "solve_rows", _empty_rows_nan),
        ("dalpha not centred", ref_entmax, "vjp_rows", _dalpha_not_centred),
        ("dalpha textbook near 1", ref_entmax, "vjp_rows", _dalpha_textbook),
        ("0**0 = 1 at alpha 2", ref_entmax, "vjp_rows", _zero_pow_zero),
    ]:
        mutants[name] = _backend(name, *_with_patch(target, attr, replacement))
    return mutants


# reference.attention looks solve_rows and vjp_rows up in the entmax module at call time, so
# patching the module attribute reaches both the attention and the entmax paths.
MUTANTS = _make()


# --- wrong kernels: the project's torch backend, broken the way a kernel author might ----------

#: name -> (output factor, {input name: gradient factor}); inputs not named keep their gradient.
_EVERY = ("q", "k", "v", "alpha", "span")
WRONG_KERNELS = {
    "every gradient zero": (1.0, dict.fromkeys(_EVERY, 0.0)),
    "every gradient x 0.9": (1.0, dict.fromkeys(_EVERY, 0.9)),
    "dq x 1.05": (1.0, {"q": 1.05}),
    "output x 0.97": (0.97, {}),
    "dk x 1.02": (1.0, {"k": 1.02}),
    "dalpha x 1.1": (1.0, {"alpha": 1.1}),
    "dz x 1.1": (1.0, {"span": 1.1}),
}


def wrong_torch_kernel(name):
    """The `torch` backend's attention with its output and/or some gradients scaled, as a
    backend named 'wrong: NAME' declaring what the torch backend declares."""
    import torch

    from attnspec.dispatch import registry

    out_factor, grad_factors = WRONG_KERNELS[name]
    base = registry.load("torch").kernel("attention")

    class _ScaleGradient(torch.autograd.Function):
        @staticmethod
        def forward(x, factor):
            return x.view_as(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.factor = inputs[1]

        @staticmethod
        def backward(ctx, grad):
            return grad * ctx.factor, None

    def attention(q, k, v, *, alpha=1.0, span=None, **kw):
        args = {"q": q, "k": k, "v": v, "alpha": alpha, "span": span}
        for arg, factor in grad_factors.items():
            if isinstance(args[arg], torch.Tensor) and args[arg].requires_grad:
                args[arg] = _ScaleGradient.apply(args[arg], factor)
        out = base.fn(**args, **kw)
        return out if out_factor == 1.0 else (out * out_factor).to(out.dtype)

    kernel = Kernel("attention", attention, base.capabilities)
    return Backend(name=f"wrong: {name}", version="wrong", kernels={"attention": kernel}, priority=-100,
                   automatic=False)


# --- wrong per-block operations (SPEC.md section 10) --------------------------------------------

def _partial_mutants():
    """name -> a change of the torch backend's per-block operations (a dict of replacements)."""
    import torch

    from attnspec.backends.torch import partial as ops

    def ignores_padding_mask(q, k, v, q_start, k_start, span, ramp, causal, key_lengths, q_offset, scale,
                             key_padding_mask=None):
        return ops.block_scores(q, k, v, q_start, k_start, span, ramp, causal, key_lengths, q_offset, scale)

    def causal_off_by_one(q, k, v, q_start, k_start, span, ramp, causal, key_lengths, q_offset, scale,
                          key_padding_mask=None):
        return ops.block_scores(q, k, v, q_start + (1 if causal else 0), k_start, span, ramp, causal, key_lengths,
                                q_offset, scale, key_padding_mask)

    def sum_w_is_sum_p(block, eps, c):
        sum_p, _ = ops.row_sums(block, eps, c)
        return sum_p, sum_p

    def lone_bound_of_alpha_2(block, eps):
        return ops.row_bounds(block, torch.ones_like(eps))

    def merge_without_rescaling(lse, out, lse_b, out_b):
        return torch.logaddexp(lse, lse_b), out + out_b

    def dk_scaled(*args):
        dq, dk, dv, deps, dspan = ops.backward_block(*args)
        return dq, dk * 1.01, dv, deps, dspan

    def deps_without_psi(block, eps, c, gbar, dout, scale, ramp, need_eps):
        dq, dk, dv, deps, dspan = ops.backward_block(block, eps, c, gbar, dout, scale, ramp, False)
        return dq, dk, dv, deps, dspan

    return {
        "partial: key_padding_mask ignored": {"block_scores": ignores_padding_mask},
        "partial: causal off by one": {"block_scores": causal_off_by_one},
        "partial: sum p/u is sum p": {"row_sums": sum_w_is_sum_p},
        "partial: row bounds at alpha 2": {"row_bounds": lone_bound_of_alpha_2},
        "partial: online merge without rescaling": {"merge_softmax": merge_without_rescaling},
        "partial: dk x 1.01": {"backward_block": dk_scaled},
        "partial: deps dropped": {"backward_block": deps_without_psi},
    }


WRONG_PARTIAL_OPS = ("partial: key_padding_mask ignored", "partial: causal off by one", "partial: sum p/u is sum p",
                     "partial: row bounds at alpha 2", "partial: online merge without rescaling",
                     "partial: dk x 1.01", "partial: deps dropped")


def wrong_partial_backend(name):
    """The torch backend's 'partial' kernel with one operation replaced, as a backend of its own."""
    import types

    from attnspec.backends import torch as torch_backends
    from attnspec.backends.torch import partial as ops

    names = ("block_scores", "row_bounds", "row_sums", "weighted_values", "softmax_block", "merge_softmax",
             "gbar", "backward_block")
    namespace = types.SimpleNamespace(**{n: getattr(ops, n) for n in names})
    for attr, fn in _partial_mutants()[name].items():
        setattr(namespace, attr, fn)
    kernel = Kernel("partial", namespace, torch_backends.PARTIAL.capabilities)
    return Backend(name="mutant-" + name.replace(" ", "-").replace(":", "").replace("/", "-"), version="mutant",
                   kernels={"partial": kernel}, priority=-100, automatic=False)
