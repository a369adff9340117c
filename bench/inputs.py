"""The inputs of a case: arrays drawn once in float64 and rounded to the case's dtype, the same
for every target, then handed to each runner's framework."""

from __future__ import annotations

import numpy as np

from .runners import round_to_dtype
from .sweep import Case


def draw_arrays(cfg: Case, seed: int) -> tuple:
    """q, k, v and the output cotangent g, drawn in float64 (standard normal: scores
    q.k/sqrt(D) are then about N(0, 1)) and rounded to the dtype; the same for every target."""
    key = [seed, cfg.B, cfg.H, cfg.Hkv, cfg.L, cfg.D] + ([cfg.Lk] if cfg.Lk != cfg.L else [])
    rng = np.random.default_rng(key)
    shapes = ((cfg.B, cfg.H, cfg.L, cfg.D), (cfg.B, cfg.Hkv, cfg.Lk, cfg.D), (cfg.B, cfg.Hkv, cfg.Lk, cfg.D),
              (cfg.B, cfg.H, cfg.L, cfg.D))
    return tuple(round_to_dtype(rng.standard_normal(s), cfg.dtype) for s in shapes)


def learned_values(cfg: Case) -> tuple:
    """The learned [H] parameters of a case (alpha, then span when there is one), or ()."""
    if not cfg.learned:
        return ()
    values = (np.full(cfg.H, cfg.alpha),)
    return values + ((np.full(cfg.H, cfg.span),) if cfg.span is not None else ())


def make_inputs(runner, cfg: Case, device: str, seed: int):
    """(q, k, v, g, *learned params) of the runner's framework, and the float64 arrays."""
    arrays = draw_arrays(cfg, seed)
    grad = cfg.mode == "fwd+bwd"
    inputs = runner.inputs(arrays, cfg.dtype, device, grad=grad)
    if cfg.learned:
        inputs = inputs + runner.params(learned_values(cfg), cfg.dtype, device, grad=grad)
    return inputs, arrays
