"""Context-parallel attention on a torch.distributed process group (SPEC.md semantics).

The sequence is split in contiguous blocks over the ranks of `group`: rank r holds the
queries, keys and values at its positions (any lengths, one or more each). Every rank calls
`attention` with its own block; each gets its block of the output, and the backward gives each
rank the gradients of its own q, k, v and the gradients of alpha and span summed over every
query of every rank (the sequence group: a sum, never a data-parallel mean).

Heads take one of two paths (decided identically on every rank):
- halo: span heads whose reach fits the static bound `max_span`. A head with span z reads only
  keys with |d| < attnspec.geometry.reach(z, R), so each rank fetches the reach(max_span, R) - 1
  keys before its block (and after it, without causal) from the ranks that own them, which
  may be several, and runs the ordinary single-device attention on its queries against that
  window: every key a row may read is local, so the result is the single-device result, for any
  alpha. The backward sends the halo keys' dk/dv back to their owners, which add them.
- ring: every other head (no span, or a reach beyond max_span: never a truncated window).
  Key/value blocks travel round the ring. alpha = 1 heads: one pass with the online merge
  (log-sum-exp and the output rescaled as blocks arrive). alpha > 1: c, the row normaliser,
  depends on every readable key, so it is solved globally: one pass of K gathers the bracket
  (largest score, sum of weights, lone-key bound); then each Newton step on h(c) = log sum p
  sends K round the ring once more (each rank sums p and p/u of its own rows against every
  block; nothing but K moves); every rank stops after the same step (an all-reduced flag); a
  last pass of K and V gives sum p v and the backward's row statistic sum w v / sum w. The
  backward sends K, V and the dk/dv accumulators of each block round the ring once; the
  accumulators arrive back at their owners.

Only torch.distributed's point-to-point operations and all-reduce/all-gather are used (gloo on
CPU; NCCL on GPUs runs the same calls).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import validation
from . import geometry

_TRAFFIC = {"p2p_bytes": 0, "allreduce_bytes": 0, "p2p_messages": 0}


def traffic(reset: bool = False) -> dict:
    """Bytes this process has sent point-to-point and contributed to all-reduces (a copy);
    reset=True zeroes the counters."""
    out = dict(_TRAFFIC)
    if reset:
        for key in _TRAFFIC:
            _TRAFFIC[key] = 0
    return out


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ops():
    """The torch backend's 'partial' kernel (SPEC.md section 10): the per-block operations, taken
    from the declaration the conformance suite checks."""
    from attnspec.dispatch import registry

    return registry.load("torch").kernel("partial").fn


def _all_reduce(x, group, op=dist.ReduceOp.SUM):
    _TRAFFIC["allreduce_bytes"] += x.numel() * x.element_size()
    dist.all_reduce(x, op=op, group=group)
    return x


def _p2p(sends, recvs, group):
    """sends: [(tensor, peer rank in group)], recvs: [(buffer, peer)]; waits for all."""
    ops = []
    for tensor, peer in sends:
        _TRAFFIC["p2p_bytes"] += tensor.numel() * tensor.element_size()
        _TRAFFIC["p2p_messages"] += 1
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), dist.get_global_rank(group, peer), group))
    for buffer, peer in recvs:
        ops.append(dist.P2POp(dist.irecv, buffer, dist.get_global_rank(group, peer), group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


# ---------------------------------------------------------------------------------------------
# Halo exchange


class _Plan:
    """What this rank sends and receives for one window exchange."""

    def __init__(self, layout, rank, windows):
        self.rank = rank
        self.start, _ = layout.bounds(rank)
        self.a, self.b = windows[rank]
        pieces = geometry.exchange(layout, windows)
        self.sends = [p for p in pieces if p.owner == rank]
        self.recvs = [p for p in pieces if p.reader == rank]


def _gather_window(x, plan, group):
    """x [B, Hkv, L_r, C] (this rank's keys) -> [B, Hkv, b - a, C]: the window's keys."""
    B, Hkv, _, C = x.shape
    out = x.new_zeros((B, Hkv, plan.b - plan.a, C))
    sends, recvs = [], []
    for p in plan.sends:
        piece = x[:, :, p.lo - plan.start:p.hi - plan.start]
        if p.reader == plan.rank:
            out[:, :, p.lo - plan.a:p.hi - plan.a] = piece
        else:
            sends.append((piece.contiguous(), p.reader))
    buffers = []
    for p in plan.recvs:
        if p.owner != plan.rank:
            buffer = x.new_empty((B, Hkv, p.hi - p.lo, C))
            recvs.append((buffer, p.owner))
            buffers.append((p, buffer))
    _p2p(sends, recvs, group)
    for p, buffer in buffers:
        out[:, :, p.lo - plan.a:p.hi - plan.a] = buffer
    return out


def _scatter_window_grad(grad, plan, local_len, group):
    """The transpose of _gather_window: each key's gradient summed at its owner."""
    B, Hkv, _, C = grad.shape
    out = grad.new_zeros((B, Hkv, local_len, C))
    sends, recvs, buffers = [], [], []
    for p in plan.recvs:  # the pieces this rank read go back to their owners
        piece = grad[:, :, p.lo - plan.a:p.hi - plan.a]
        if p.owner == plan.rank:
            out[:, :, p.lo - plan.start:p.hi - plan.start] += piece
        else:
            sends.append((piece.contiguous(), p.owner))
    for p in plan.sends:
        if p.reader != plan.rank:
            buffer = grad.new_empty((B, Hkv, p.hi - p.lo, C))
            recvs.append((buffer, p.reader))
            buffers.append((p, buffer))
    _p2p(sends, recvs, group)
    for p, buffer in buffers:
        out[:, :, p.lo - plan.start:p.hi - plan.start] += buffer
    return out


# ---------------------------------------------------------------------------------------------
# Ring


def _ring(first, shape_of, step, group, rank, world):
    """Send `first` (this rank's block) round the ring: step(owner, block) runs on every
    block in turn (this rank's first); the next block is received while the current one is
    being used. shape_of(owner) is the shape of owner's block."""
    block, owner = first, rank
    for t in range(world):
        pending = None
        if t < world - 1:
            nxt = (rank - t - 1) % world
            buffer = block.new_empty(shape_of(nxt))
            ops = [dist.P2POp(dist.isend, block, dist.get_global_rank(group, (rank + 1) % world), group),
                   dist.P2POp(dist.irecv, buffer, dist.get_global_rank(group, (rank - 1) % world), group)]
            _TRAFFIC["p2p_bytes"] += block.numel() * block.element_size()
            _TRAFFIC["p2p_messages"] += 1
            pending = (dist.batch_isend_irecv(ops), buffer, nxt)
        step(owner, block)
        if pending is not None:
            works, buffer, nxt = pending
            for work in works:
                work.wait()
            block, owner = buffer, nxt


#: Elements of one ring block's score buffers [B, H, tile, L_s]: queries are processed in tiles
#: of rows small enough for it (at least RING_MIN_TILE rows), so memory does not grow with
#: L_r * L_s. Tests lower both to exercise many tiles.
RING_TILE_ELEMENTS = 1 << 20
RING_MIN_TILE = 16


class _Ring:
    """The ring path for a set of heads: forward state and backward."""

    def __init__(self, cfg, eps):
        self.cfg = cfg
        self.eps = eps  # [1, H', 1, 1]

    def _tiles(self, q, owner):
        B, H, Lr, _ = q.shape
        per_row = max(1, B * H * self.cfg.layout.lengths[owner])
        tile = max(RING_MIN_TILE, RING_TILE_ELEMENTS // per_row)
        for i0 in range(0, Lr, tile):
            yield i0, min(Lr, i0 + tile)

    def _block(self, q, kv, owner, D, span, i0, i1):
        partial = _ops()

        cfg = self.cfg
        # A travelling block holds [k | v (absent in the passes that need only k) | readable].
        width = kv.shape[-1] - (1 if cfg.has_mask else 0)
        readable = kv[:, 0, :, width] > 0.5 if cfg.has_mask else None
        return partial.block_scores(q[:, :, i0:i1], kv[..., :D], kv[..., D:width], cfg.start + i0,
                                    cfg.layout.starts[owner], span, cfg.ramp, cfg.causal, cfg.key_lengths,
                                    cfg.q_offset, cfg.scale, readable)

    def _needed(self, owner):
        cfg = self.cfg
        return geometry.ring_blocks_needed(cfg.layout, cfg.rank, owner, cfg.causal, cfg.offset_max, cfg.max_length)

    def forward(self, q, k, v, span):
        """out [B, H', L_r, Dv] in the compute dtype; keeps c, sum w v and sum w."""
        from attnspec.backends.torch import entmax as _entmax
        partial = _ops()

        cfg = self.cfg
        dtype = _compute_dtype(q.dtype)
        B, H, Lr, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        eps = self.eps
        row = (B, H, Lr, 1)
        extra = [_readable_channel(cfg, Hkv, dtype)] if cfg.has_mask else []
        kv = torch.cat([k.to(dtype), v.to(dtype)] + extra, -1)

        def shape_kv(owner):
            return (B, Hkv, cfg.layout.lengths[owner], D + Dv + len(extra))

        def shape_k(owner):
            return (B, Hkv, cfg.layout.lengths[owner], D + len(extra))

        def full(value):
            return torch.full(row, value, dtype=dtype, device=q.device)

        if cfg.ring_softmax_only:  # alpha = 1 on every ring head: one pass, online merge
            lse, out = full(-torch.inf), torch.zeros((B, H, Lr, Dv), dtype=dtype, device=q.device)

            def merge(owner, block):
                if not self._needed(owner):
                    return
                for i0, i1 in self._tiles(q, owner):
                    lse_b, out_b = partial.softmax_block(self._block(q, block, owner, D, span, i0, i1))
                    lse[..., i0:i1, :], out[..., i0:i1, :] = partial.merge_softmax(
                        lse[..., i0:i1, :], out[..., i0:i1, :], lse_b, out_b)

            _ring(kv, shape_kv, merge, cfg.group, cfg.rank, cfg.world)
            nonempty = torch.isfinite(lse)
            self.c = torch.where(nonempty, lse, 0.0)
            self.wv = out
            self.wsum = nonempty.to(dtype)
            return out

        kk = torch.cat([k.to(dtype)] + extra, -1).contiguous()
        top, mass, lone, lse = full(-torch.inf), full(0.0), full(-torch.inf), full(-torch.inf)

        def bounds(owner, block):
            if not self._needed(owner):
                return
            for i0, i1 in self._tiles(q, owner):
                t_b, m_b, l_b, e_b = partial.row_bounds(self._block(q, block, owner, D, span, i0, i1), eps)
                rows = (Ellipsis, slice(i0, i1), slice(None))
                top[rows] = torch.maximum(top[rows], t_b)
                mass[rows] += m_b
                lone[rows] = torch.maximum(lone[rows], l_b)
                lse[rows] = torch.logaddexp(lse[rows], e_b)

        _ring(kk, shape_k, bounds, cfg.group, cfg.rank, cfg.world)
        nonempty = torch.isfinite(top)
        top = torch.where(nonempty, top, 0.0)
        safe = torch.where(eps > 0, eps, 1.0)
        lo = torch.where(nonempty, lone, 0.0)
        hi = top - torch.expm1(-safe * torch.log(torch.where(nonempty, mass, 1.0))) / safe
        hi = torch.maximum(hi, lo)
        solving = nonempty & (eps > 0)
        c = lo
        tolerance = 4 * torch.finfo(dtype).eps
        self.newton_steps = 0
        for _ in range(_entmax.ITERATIONS[dtype]):
            sum_p, sum_w = full(0.0), full(0.0)

            def newton_sums(owner, block, c=c):
                if not self._needed(owner):
                    return
                for i0, i1 in self._tiles(q, owner):
                    sp, sw = partial.row_sums(self._block(q, block, owner, D, span, i0, i1), eps,
                                              c[..., i0:i1, :])
                    sum_p[..., i0:i1, :] += sp
                    sum_w[..., i0:i1, :] += sw

            _ring(kk, shape_k, newton_sums, cfg.group, cfg.rank, cfg.world)
            self.newton_steps += 1
            # Newton on h = log sum p, safeguarded as the single-device solve (SPEC.md 2.4).
            h = torch.log(sum_p)
            slope = -sum_w / sum_p
            proposal, lo, hi = _entmax.safeguarded_step(c, lo, hi, h, slope)
            c_new = torch.where(solving & (h != 0), proposal, c)
            moving = solving & ((c_new - c).abs() > tolerance * (1 + (c_new - top).abs()))
            c = c_new
            flag = torch.tensor([1.0 if bool(moving.any()) else 0.0], dtype=torch.float64, device=q.device)
            _all_reduce(flag, cfg.group, dist.ReduceOp.MAX)  # every rank stops after the same step
            if flag.item() == 0:
                break
        c = torch.where(eps > 0, c, torch.where(torch.isfinite(lse), lse, 0.0))
        c = torch.where(nonempty, c, 0.0)
        out = torch.zeros((B, H, Lr, Dv), dtype=dtype, device=q.device)
        wv = torch.zeros_like(out)
        wsum = full(0.0)

        def values(owner, block):
            if not self._needed(owner):
                return
            for i0, i1 in self._tiles(q, owner):
                pv, wv_b, ws = partial.weighted_values(self._block(q, block, owner, D, span, i0, i1), eps,
                                                       c[..., i0:i1, :])
                out[..., i0:i1, :] += pv
                wv[..., i0:i1, :] += wv_b
                wsum[..., i0:i1, :] += ws

        _ring(kv, shape_kv, values, cfg.group, cfg.rank, cfg.world)
        self.c, self.wv, self.wsum = c, wv, wsum
        return out

    def backward(self, q, k, v, span, dout, need_eps):
        """(dq, dk, dv, deps [H'], dspan [H'] or None) of this rank's part, in the compute dtype."""
        partial = _ops()

        cfg = self.cfg
        dtype = _compute_dtype(q.dtype)
        B, H, Lr, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        dout = dout.to(dtype)
        gbar = partial.gbar(dout, self.wv, self.wsum)
        dq = torch.zeros((B, H, Lr, D), dtype=dtype, device=q.device)
        deps = torch.zeros(H, dtype=dtype, device=q.device)
        dspan = None if span is None else torch.zeros(H, dtype=dtype, device=q.device)
        # Block and its gradient accumulators travel together: [k, v, (readable), dk, dv].
        extra = [_readable_channel(cfg, Hkv, dtype)] if cfg.has_mask else []
        width = D + Dv + len(extra)
        acc = D + Dv
        payload = torch.cat([k.to(dtype), v.to(dtype)] + extra + [torch.zeros((B, Hkv, Lr, acc), dtype=dtype,
                                                                            device=q.device)], -1)
        owner = cfg.rank
        for t in range(cfg.world):
            if self._needed(owner):
                for i0, i1 in self._tiles(q, owner):
                    block = self._block(q, payload[..., :width], owner, D, span, i0, i1)
                    rows = (Ellipsis, slice(i0, i1), slice(None))
                    dq_b, dk_b, dv_b, deps_b, dspan_b = partial.backward_block(
                        block, self.eps, self.c[rows], gbar[rows], dout[rows], cfg.scale, cfg.ramp, need_eps)
                    dq[rows] += dq_b
                    payload[..., width:width + D] += dk_b
                    payload[..., width + D:] += dv_b
                    deps += deps_b
                    if dspan is not None:
                        dspan += dspan_b
            nxt = (cfg.rank - t - 1) % cfg.world
            if t < cfg.world - 1:
                send = payload
                buffer = payload.new_empty((B, Hkv, cfg.layout.lengths[nxt], width + acc))
            else:  # the accumulators go home: the next rank owns this block
                send = payload[..., width:].contiguous()
                buffer = payload.new_empty((B, Hkv, Lr, acc))
            if cfg.world > 1:
                _p2p([(send, (cfg.rank + 1) % cfg.world)], [(buffer, (cfg.rank - 1) % cfg.world)], cfg.group)
            else:
                buffer = send
            payload, owner = buffer, nxt
        return dq, payload[..., :D], payload[..., D:], deps, dspan


# ---------------------------------------------------------------------------------------------
# Head selection (mixed heads, grouped-query attention)


def _select(heads, H, Hkv):
    """(q head indices, kv head indices) for a subset of query heads: whole kv groups keep
    their grouping; otherwise each selected head gets its own copy of its kv head."""
    G = H // Hkv
    heads = sorted(heads)
    groups = sorted({h // G for h in heads})
    if len(heads) == len(groups) * G:
        return heads, groups
    return heads, [h // G for h in heads]


class _Config:
    pass


def _readable_channel(cfg, Hkv, dtype):
    """This rank's key_padding_mask as one channel of its key blocks: [B, Hkv, L_r, 1], 1 where
    readable (exact in every dtype)."""
    B, Lr = cfg.readable.shape
    return cfg.readable[:, None, :, None].to(dtype).expand(B, Hkv, Lr, 1)


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, q, k, v, alpha, span):
        dtype = _compute_dtype(q.dtype)
        B, H, Lr, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        out = torch.zeros((B, H, Lr, Dv), dtype=dtype, device=q.device)
        ctx.cfg = cfg
        ctx.halo = None
        ctx.ring = None
        if cfg.halo_heads:
            qi, kvi = _select(cfg.halo_heads, H, Hkv)
            qi_t = torch.tensor(qi, device=q.device)
            kvi_t = torch.tensor(kvi, device=q.device)
            kv = torch.cat([k, v], -1).index_select(1, kvi_t)
            if cfg.has_mask:  # the mask travels with the keys, as one more channel
                kv = torch.cat([kv, _readable_channel(cfg, kv.shape[1], kv.dtype)], -1)
            window = _gather_window(kv, cfg.plan, cfg.group)
            if window.shape[2] > 0:
                leaves = [q.index_select(1, qi_t).detach().requires_grad_(),
                          window.detach().requires_grad_(),
                          alpha.index_select(0, qi_t).detach().requires_grad_()]
                if span is not None:
                    leaves.append(span.index_select(0, qi_t).detach().requires_grad_())
                from attnspec import api

                with torch.set_grad_enabled(cfg.need_graph):
                    w = leaves[1]
                    Dv = v.shape[3]
                    readable = w[:, 0, :, D + Dv].detach() > 0.5 if cfg.has_mask else None
                    out_h = api.attention(
                        leaves[0], w[..., :D], w[..., D:D + Dv], alpha=leaves[2], key_padding_mask=readable,
                        span=leaves[3] if span is not None else None, ramp=cfg.ramp, causal=cfg.causal,
                        key_lengths=cfg.window_lengths, q_offset=cfg.window_offset, scale=cfg.scale,
                        backend=cfg.backend)
                out[:, qi] = out_h.detach().to(dtype)
                ctx.halo = (qi_t, kvi_t, out_h, leaves)
            else:
                ctx.halo = (qi_t, kvi_t, None, None)
        if cfg.ring_heads:
            qi, kvi = _select(cfg.ring_heads, H, Hkv)
            qi_t = torch.tensor(qi, device=q.device)
            kvi_t = torch.tensor(kvi, device=q.device)
            eps = (alpha.index_select(0, qi_t).detach().to(dtype) - 1)[None, :, None, None]
            span_r = None if span is None else span.index_select(0, qi_t).detach().to(dtype)
            ring = _Ring(cfg, eps)
            qr, kr, vr = q.index_select(1, qi_t), k.index_select(1, kvi_t), v.index_select(1, kvi_t)
            out[:, qi] = ring.forward(qr, kr, vr, span_r)
            ctx.ring = (qi_t, kvi_t, ring, span_r)
        ctx.save_for_backward(q, k, v)
        ctx.has_span = span is not None
        ctx.alpha_meta = (alpha.dtype, alpha.shape)
        ctx.span_meta = None if span is None else (span.dtype, span.shape)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        cfg = ctx.cfg
        q, k, v = ctx.saved_tensors
        dtype = _compute_dtype(q.dtype)
        B, H, Lr, D = q.shape
        Hkv = k.shape[1]
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        dkv = torch.zeros((B, Hkv, Lr, D + v.shape[3]), dtype=dtype, device=q.device)
        dalpha = torch.zeros(H, dtype=dtype, device=q.device)
        dspan = torch.zeros(H, dtype=dtype, device=q.device)
        need_alpha = bool(ctx.needs_input_grad[4])
        if ctx.halo is not None:
            qi_t, kvi_t, out_h, leaves = ctx.halo
            if out_h is not None:
                grads = torch.autograd.grad(out_h, leaves, dout.index_select(1, qi_t).to(out_h.dtype),
                                            allow_unused=True)
                grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
                dq.index_add_(1, qi_t, grads[0].to(dtype))
                dwin = grads[1][..., :dkv.shape[3]].to(dtype)
                dalpha.index_add_(0, qi_t, grads[2].to(dtype))
                if ctx.has_span:
                    dspan.index_add_(0, qi_t, grads[3].to(dtype))
            else:
                dwin = torch.zeros((B, len(kvi_t), 0, dkv.shape[3]), dtype=dtype, device=q.device)
            dkv.index_add_(1, kvi_t, _scatter_window_grad(dwin, cfg.plan, Lr, cfg.group))
        if ctx.ring is not None:
            qi_t, kvi_t, ring, span_r = ctx.ring
            dq_r, dk_r, dv_r, deps_r, dspan_r = ring.backward(
                q.index_select(1, qi_t), k.index_select(1, kvi_t), v.index_select(1, kvi_t), span_r,
                dout.index_select(1, qi_t), need_alpha)
            dq.index_add_(1, qi_t, dq_r)
            dkv.index_add_(1, kvi_t, torch.cat([dk_r, dv_r], -1))
            dalpha.index_add_(0, qi_t, deps_r)
            if dspan_r is not None:
                dspan.index_add_(0, qi_t, dspan_r)
        # alpha and span are shared by every query of the sequence group: their gradients add up.
        stats = torch.cat([dalpha, dspan]).to(torch.float64 if dtype == torch.float64 else torch.float32)
        _all_reduce(stats, cfg.group)
        dalpha, dspan = stats[:H], stats[H:]
        dk, dv = dkv[..., :D], dkv[..., D:]
        return (None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dalpha.to(ctx.alpha_meta[0]),
                dspan.to(ctx.span_meta[0]) if ctx.has_span else None)


def _per_head(value, H, dtype, device, name):
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=dtype)
    else:
        t = torch.tensor(float(value), dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(H)
    if tuple(t.shape) != (H,):
        raise ValueError(f"{name} must be a scalar or have shape [H] = [{H}]; got shape {list(t.shape)}")
    return t


def _offsets(q_offset, B, device):
    if q_offset is None:
        values = [0] * B  # Lq = Lk over the whole sequence: the default Lk - Lq is 0
    elif isinstance(q_offset, torch.Tensor):
        values = [int(x) for x in q_offset.reshape(-1).tolist()]
        values = values * B if len(values) == 1 else values
    else:
        values = [int(q_offset)] * B
    if len(values) != B:
        raise ValueError(f"q_offset must be an integer or have shape [B] = [{B}]; got {len(values)} values")
    return values


def _local_lengths(key_lengths, B, device):
    """key_lengths as int64 [B], checked here (shape, integers, >= 0); the upper bound needs
    every rank's length."""
    if isinstance(key_lengths, torch.Tensor):
        if key_lengths.is_floating_point() or key_lengths.is_complex() or key_lengths.dtype == torch.bool:
            raise TypeError(f"key_lengths must hold integers; got dtype {key_lengths.dtype}")
        lengths = key_lengths.to(device=device, dtype=torch.int64).reshape(-1)
    else:
        values = list(key_lengths) if hasattr(key_lengths, "__len__") else [key_lengths]
        if not all(isinstance(x, int) or (hasattr(x, "dtype") and "int" in str(x.dtype)) for x in values):
            raise TypeError(f"key_lengths must hold integers; got {values}")
        lengths = torch.tensor([int(x) for x in values], dtype=torch.int64, device=device)
    if lengths.shape[0] != B:
        raise ValueError(f"key_lengths must have shape [B] = [{B}]; got {list(lengths.shape)}")
    negative = [int(x) for x in lengths.tolist() if int(x) < 0]
    if negative:
        raise ValueError(f"key_lengths must be >= 0; got {negative}")
    return lengths


def attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None, q_offset=None,
              scale=None, max_span=None, key_padding_mask=None, group=None, backend=None):
    """Attention over a sequence split in contiguous blocks over the ranks of `group`.

    q [B, H, L_r, D], k [B, Hkv, L_r, D], v [B, Hkv, L_r, Dv]: this rank's positions (L_r may
    differ between ranks). alpha, span, ramp, causal, scale: as attnspec.attention (alpha and
    span the same on every rank). key_lengths [B] and q_offset (int or [B]) refer to global
    positions (q_offset defaults to 0: queries and keys at the same positions).
    key_padding_mask: None, or this rank's slice [B, L_r] (bool, True = readable) of the
    sequence's [B, L] mask (SPEC.md 5.1): masked keys may hold NaN, never change an output,
    get dk = dv = 0, and rows with no readable key give zeros. It travels with the halo keys and
    the ring's blocks.
    max_span: the static halo bound (e.g. the layer's largest span): span heads with
    z <= max_span (more precisely reach(z, R) <= reach(max_span, R), attnspec.geometry) fetch reach(max_span, R) - 1
    neighbouring keys; every other head takes the ring over all keys. None: every head rings.
    backend: the single-device backend for the halo heads (None: the dispatcher's choice).
    Returns this rank's output block [B, H, L_r, Dv]; differentiable in q, k, v, alpha, span.

    Errors: every check of this rank's own arguments (types, shapes, dtypes, alpha and span per
    head, q_offset, key_lengths' shape, integers and sign, the mask's shape and dtype, max_span)
    raises before this rank waits on another, so a malformed call on one rank never leaves it
    blocked. Only key_lengths' upper bound (the whole sequence's length, the sum of every rank's
    L_r) needs the gathered layout: it raises after the first collective, on every rank together
    (every rank passes the same key_lengths).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attnspec.distributed.torch.attention needs an initialised torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        raise TypeError("q, k and v must be torch tensors")
    validation.validate_attention(q, k, v, alpha=alpha, span=span, ramp=ramp, causal=causal, scale=scale,
                                  key_padding_mask=key_padding_mask)
    if q.shape[2] != k.shape[2]:
        raise ValueError("each rank holds the queries and the keys of the same positions: q and k must have "
                         f"one length; got q: {q.shape[2]}, k: {k.shape[2]}")
    if max_span is not None and (not math.isfinite(float(max_span)) or float(max_span) < 0):
        raise ValueError(f"max_span must be None or a finite number >= 0; got {max_span}")
    group = group if group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    B, H, Lr, D = q.shape
    Hkv = k.shape[1]
    dtype = _compute_dtype(q.dtype)
    device = q.device
    alpha_h = _per_head(alpha, H, dtype, device, "alpha")
    span_h = None if span is None else _per_head(span, H, dtype, device, "span")
    offsets = _offsets(q_offset, B, device)
    lengths = None if key_lengths is None else _local_lengths(key_lengths, B, device)
    readable = None if key_padding_mask is None else key_padding_mask.to(torch.bool)

    # One small all-gather: every rank's length, and each head's reach in keys (the max over
    # ranks decides, so that every rank takes the same path even if spans drifted apart).
    reach = torch.zeros(H, dtype=torch.int64, device=device)
    if span_h is not None:
        name = str(dtype).removeprefix("torch.")
        reach = torch.tensor([geometry.reach_keys(z, ramp, name) for z in span_h.detach().tolist()],
                             dtype=torch.int64, device=device)
    entmax_heads = (alpha_h.detach() > 1).to(torch.int64)
    meta = torch.cat([torch.tensor([Lr], dtype=torch.int64, device=device), reach, entmax_heads])
    gathered = [torch.empty_like(meta) for _ in range(world)]
    _TRAFFIC["allreduce_bytes"] += meta.numel() * meta.element_size()
    dist.all_gather(gathered, meta, group=group)
    gathered = torch.stack(gathered).cpu()
    layout = geometry.Layout(tuple(int(x) for x in gathered[:, 0].tolist()))
    head_reach = gathered[:, 1:H + 1].amax(0).tolist()
    entmax_heads = gathered[:, H + 1:].amax(0).tolist()
    if lengths is not None:
        bad = [int(x) for x in lengths.tolist() if int(x) > layout.total]
        if bad:
            raise ValueError(f"key_lengths must lie in [0, {layout.total}] (the whole sequence); got {bad}")

    cfg = _Config()
    cfg.layout, cfg.rank, cfg.world, cfg.group = layout, rank, world, group
    cfg.start = layout.starts[rank]
    cfg.ramp, cfg.causal = float(ramp), bool(causal)
    cfg.scale = float(D) ** -0.5 if scale is None else float(scale)
    cfg.key_lengths = lengths
    cfg.has_mask = readable is not None
    cfg.readable = readable
    cfg.max_length = None if lengths is None else int(lengths.max())
    cfg.q_offset = torch.tensor(offsets, dtype=torch.int64, device=device)
    cfg.offset_max = max(offsets)
    cfg.backend = backend
    # A graph for the halo call only when a gradient can be asked for (not under no_grad).
    cfg.need_graph = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, alpha_h, span_h))
    halo = None
    if span_h is not None and max_span is not None:
        halo = geometry.reach_keys(float(max_span), ramp, str(dtype).removeprefix("torch."))
    cfg.halo_heads = [h for h in range(H) if halo is not None and head_reach[h] <= halo]
    cfg.ring_heads = [h for h in range(H) if h not in cfg.halo_heads]
    # Every rank picks the same ring algorithm (online merge when every ring head has alpha = 1).
    cfg.ring_softmax_only = not any(entmax_heads[h] for h in cfg.ring_heads)
    cfg.halo = halo
    if cfg.halo_heads:
        windows = [geometry.window(layout, r, halo, cfg.causal, min(offsets), max(offsets)) for r in range(world)]
        cfg.plan = _Plan(layout, rank, windows)
        a, b = windows[rank]
        cfg.window_offset = torch.tensor([o + cfg.start - a for o in offsets], dtype=torch.int64, device=device)
        cfg.window_lengths = None if lengths is None else (lengths - a).clamp(0, b - a)
    return _ContextParallel.apply(cfg, q, k, v, alpha_h, span_h)
