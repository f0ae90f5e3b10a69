"""Depth-and-context attention, four exact ways (model.attn_impl), and the audit's explicit one.

All take q: (B, nh, T, hs) and k, v: (B, nh, K, T, hs) (tap l, position s) and return (B, nh, T, hs): query t
attends, with one softmax, to every key (l, s) with s <= t (Verma & Pilanci 2024, the shortcut's final layer).
An optional bias (nh, K) adds b[h, l] to every score of head h on tap l (model.tap_bias, issue 13):
softmax_{(l, s), s <= t}(q_t·k_ls/√hs + b_l). `masked` is the readable reference; `lse` and `flex` compute the
same function faster where kernels allow (`lse` and `flex` on CUDA, `chunked` on CPU), the bias and its gradient
included.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from shortcut.config import AttnImpl, UserError


def masked_depth_context_attention(q, k, v, dropout_p: float = 0.0, bias=None):
    """The readable reference: the K taps laid end to end along the key axis, one SDPA call under a boolean mask
    (with a tap bias: an additive float mask, b[h, l] where visible, -inf where not; autograd gives its gradient).

    A boolean mask rules out the fused causal kernels: all K·T² scores are computed, half of them to be masked."""
    B, nh, K, T, hs = k.shape
    if bias is not None and q.dtype not in (torch.float32, torch.float64):  # as the chunked path: see there
        with torch.autocast(q.device.type, enabled=False):  # else SDPA would be cast back down
            return masked_depth_context_attention(q.float(), k.float(), v.float(), dropout_p, bias).to(q.dtype)
    k, v = k.flatten(2, 3), v.flatten(2, 3)  # (B, nh, K*T, hs), tap-major
    # Causal in position, every tap visible: query t sees key (l, s) iff s <= t.
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = causal.repeat(1, K)  # (T, K*T)
    if bias is not None:
        mask = tap_bias_mask(mask, bias, T).to(q.dtype)  # (nh, T, K*T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def tap_bias_mask(mask, bias, T: int):
    """(T, K*T) boolean visibility and a (nh, K) bias -> (nh, T, K*T) additive scores: b[h, l] or -inf."""
    per_key = bias.repeat_interleave(T, dim=1)  # (nh, K*T), tap-major like the keys
    return per_key[:, None, :].masked_fill(~mask, float("-inf"))


def lse_depth_context_attention(q, k, v, dropout_p: float = 0.0, bias=None):
    """The fast path: K ordinary causal attentions (one per tap), merged. On CUDA, FlashAttention-2 skips the
    future half of each; torch's CPU kernel skips only whole blocks of 512 keys, so there it saves nothing.

    Exact, not approximate: a softmax over a union of key sets is the mix of the per-set softmaxes weighted by
    their normalisers. With m_l(t) = log Σ_{s<=t} exp(q_t·k_ls/√hs) the log-sum-exp of tap l and o_l(t) its causal
    attention output, y(t) = Σ_l exp(m_l(t) - M(t)) o_l(t) with M(t) = log Σ_l exp(m_l(t)). A tap bias b_l adds to
    tap l's log-sum-exp: m_l + b_l in both sums. The backward is exact too: see _TapMergedCausalAttention. No
    attention dropout (the caller uses the reference when it is on)."""
    assert dropout_p == 0.0, "the lse path has no attention dropout"
    return _TapMergedCausalAttention.apply(q, k, v, bias)


class _TapMergedCausalAttention(torch.autograd.Function):
    """Causal attention per tap with the fused kernels that also return the log-sum-exp, merged over taps.

    Public SDPA returns no log-sum-exp, hence the kernels' own entry points (CPU: the flash kernel every float
    dtype may use; CUDA: FlashAttention-2, half precision). Taps are folded into the batch, so one kernel call
    serves all K. Backward: a causal attention's backward, handed the *merged* output y and the *merged* M instead
    of its own, recomputes P = exp(S_l - M), the joint softmax restricted to tap l, and D = rowsum(dy ∘ y), the
    joint one, so it returns exactly tap l's share of the gradients (dk_l, dv_l and a term of dq; the split-KV
    identity of FlashAttention). dq sums over taps.

    With a tap bias b (nh, K), tap l's scores are S_l + b_l: the kernel is handed M - b_l instead, as
    exp(S_l - (M - b_l)) is again the joint softmax restricted to tap l. The bias' own gradient is the sum of
    tap l's dS = P ∘ (dP - D) over its keys: Σ_{B,t} w_l(t)·(dy·o_l(t) - dy·y(t)), w_l = exp(m_l + b_l - M) the
    tap's share (elementwise products and sums: no matmul)."""

    @staticmethod
    def forward(ctx, q, k, v, bias=None):
        B, nh, K, T, hs = k.shape
        qr = q.unsqueeze(1).expand(B, K, nh, T, hs).reshape(B * K, nh, T, hs)  # q once per tap
        kr, vr = (t.transpose(1, 2).reshape(B * K, nh, T, hs) for t in (k, v))  # tap folded into the batch
        o, lse, state = _causal_attention_with_lse(qr, kr, vr)  # (B*K, nh, T, hs), (B*K, nh, T)
        o, lse = o.view(B, K, nh, T, hs), lse.view(B, K, nh, T)
        b = None if bias is None else bias.float().t()[None, :, :, None]  # (1, K, nh, 1)
        if b is not None:
            lse = lse + b  # m_l + b_l
        m = lse.logsumexp(dim=1)  # (B, nh, T) the joint normaliser M
        w = (lse - m.unsqueeze(1)).exp()  # (B, K, nh, T) share of each tap, sums to 1 over K
        y = (w.unsqueeze(-1) * o).sum(dim=1).to(q.dtype)  # (B, nh, T, hs)
        if b is None:
            ctx.save_for_backward(q, kr, vr, y, m)
        else:  # the bias' gradient needs each tap's output and share
            ctx.save_for_backward(q, kr, vr, y, m, bias, o, w)
        ctx.shape, ctx.kernel_state = (B, nh, K, T, hs), state
        return y

    @staticmethod
    def backward(ctx, dy):
        q, kr, vr, y, m, *with_bias = ctx.saved_tensors
        B, nh, K, T, hs = ctx.shape
        per_tap = lambda t: t.unsqueeze(1).expand(B, K, *t.shape[1:]).reshape(B * K, *t.shape[1:])  # noqa: E731
        dy = dy.contiguous()
        if with_bias:
            bias, o, w = with_bias
            lse = (m.unsqueeze(1) - bias.float().t()[None, :, :, None]).reshape(B * K, nh, T)  # M - b_l per tap
        else:
            lse = per_tap(m)
        dq, dk, dv = _causal_attention_backward(per_tap(dy), per_tap(q), kr, vr, per_tap(y), lse,
                                                ctx.kernel_state)  # 3 x (B*K, nh, T, hs)
        dq = dq.view(B, K, nh, T, hs).sum(dim=1)  # (B, nh, T, hs)
        dk, dv = (t.view(B, K, nh, T, hs).transpose(1, 2) for t in (dk, dv))  # 2 x (B, nh, K, T, hs)
        if not with_bias:
            return dq, dk, dv, None
        dyo = (dy.float().unsqueeze(1) * o.float()).sum(dim=-1)  # (B, K, nh, T) dy·o_l
        # dy·y = Σ_l w_l·dy·o_l, summed here in float32: from the rounded y (bf16) it would not cancel dy·o_l
        dyy = (w * dyo).sum(dim=1, keepdim=True)  # (B, 1, nh, T)
        dbias = (w * (dyo - dyy)).sum(dim=(0, 3)).t()  # (nh, K)
        return dq, dk, dv, dbias.to(bias.dtype)


def lse_kernel_available(q) -> bool:
    """Whether _causal_attention_with_lse has a kernel for q (CUDA: FlashAttention-2 wants fp16/bf16, hs % 8 == 0,
    sm80+); where not (float32 on CUDA, say), the reference runs instead."""
    if q.device.type == "cpu":
        return True
    hs = q.size(-1)
    return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and hs % 8 == 0 and hs <= 256
            and _flash_backend_ready(q.device.index or 0))


@torch.compiler.assume_constant_result  # a constant to torch.compile: no graph break in every shortcut block
def _flash_backend_ready(index: int) -> bool:
    return torch.backends.cuda.flash_sdp_enabled() and torch.cuda.get_device_capability(index) >= (8, 0)


def _causal_attention_with_lse(q, k, v):
    """(N, nh, T, hs) x 3 -> causal attention output, its log-sum-exp (N, nh, T) float32, and the backward's state."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        return out, lse, ()
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False)
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _causal_attention_backward(dy, q, k, v, y, lse, state):
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dy, q, k, v, y, lse, 0.0, True)
    cum_q, cum_k, max_q, max_k, seed, offset = state
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dy, q, k, v, y, lse.contiguous(), cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset)


# Positions per kernel call of the chunked path. Measured (2 cores, fp32, forward+backward, the first and third sizes
# of benchmarks/attn_impls.py): chunks of 16 / 32 / 64 took 112 / 99 / 97 ms at T=256, K=6 and 798 / 722 / 750 ms at
# T=512, K=12 (the masked path: 144 and 1,203 ms).
CHUNK = 32


def chunked_depth_context_attention(q, k, v, dropout_p: float = 0.0, bias=None, chunk: int = CHUNK):
    """The CPU fast path: torch's CPU flash kernel on position-major keys, `chunk` positions at a time, so that
    the future is skipped except within a chunk. About (1 + chunk/T)/2 of the masked path's K·T² scores.

    With the keys laid out position-major (key s·K + l is tap l at position s), query t sees exactly the prefix
    of (t+1)·K keys. Forward: each chunk of queries [t0, t1) attends to the prefix [0, t1·K) under an additive mask
    that hides only its own future within the chunk; the kernel returns each query's log-sum-exp. Backward: each
    chunk of keys [s0, s1) with the queries [s0, T) that see it, given the merged output and log-sum-exp (the
    split-KV identity, as in _TapMergedCausalAttention), so every dk, dv is written once and dq sums over chunks.
    A tap bias rides along as one more head dimension: q gains √hs, k_l gains b_l and v a zero, so the scores are
    q·k/√hs + b_l and the kernel's gradient of that key column is Σ_t dS, the bias' gradient (exact, and ~14%
    slower at hs=64). No attention dropout (the caller uses the reference when it is on)."""
    assert dropout_p == 0.0, "the chunked path has no attention dropout"
    if bias is not None and q.dtype not in (torch.float32, torch.float64):
        # the bias' gradient sums one term per key, terms that largely cancel: in bf16 that sum would be noise
        return _ChunkedDepthContextAttention.apply(q.float(), k.float(), v.float(), bias, chunk).to(q.dtype)
    return _ChunkedDepthContextAttention.apply(q, k, v, bias, chunk)


class _ChunkedDepthContextAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, chunk):
        B, nh, K, T, hs = k.shape
        q = q.contiguous()  # the CPU kernel assumes a unit stride in the head dimension
        width = hs + (bias is not None)  # + the bias column
        kp, vp = (t.new_empty(B, nh, T, K, width) for t in (k, v))  # position-major: key s*K + l
        kp[..., :hs], vp[..., :hs] = k.transpose(2, 3), v.transpose(2, 3)
        if bias is not None:
            kp[..., hs], vp[..., hs] = bias.to(k.dtype)[None, :, None, :], 0
            ctx.bias_dtype = bias.dtype
            q = torch.cat([q, q.new_full((B, nh, T, 1), math.sqrt(hs))], dim=-1)  # q·k/√hs + √hs·b_l/√hs
        kp, vp = kp.view(B, nh, T * K, width), vp.view(B, nh, T * K, width)
        y = q.new_empty(B, nh, T, width)
        lse = q.new_empty(B, nh, T, dtype=torch.float32)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            y[:, :, t0:t1], lse[:, :, t0:t1] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[:, :, t0:t1], kp[:, :, :t1 * K], vp[:, :, :t1 * K], attn_mask=_visible(t0, t1, 0, t1, K, q),
                scale=1 / math.sqrt(hs))
        ctx.save_for_backward(q, kp, vp, y, lse)
        ctx.shape, ctx.chunk, ctx.has_bias = (B, nh, K, T, hs), chunk, bias is not None
        return y[..., :hs]  # (B, nh, T, hs)

    @staticmethod
    def backward(ctx, dy):
        q, kp, vp, y, lse = ctx.saved_tensors
        B, nh, K, T, hs = ctx.shape
        dy = F.pad(dy, (0, y.size(-1) - hs)).contiguous()  # the bias column's output is 0, its gradient too
        dq = torch.zeros_like(q, dtype=torch.float32)  # summed over T/chunk key chunks: in float32
        dk, dv = torch.empty_like(kp), torch.empty_like(vp)
        for s0 in range(0, T, ctx.chunk):
            s1 = min(T, s0 + ctx.chunk)
            keys = slice(s0 * K, s1 * K)
            gq, dk[:, :, keys], dv[:, :, keys] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dy[:, :, s0:], q[:, :, s0:], kp[:, :, keys], vp[:, :, keys], y[:, :, s0:], lse[:, :, s0:], 0.0,
                False, attn_mask=_visible(s0, T, s0, s1, K, q), scale=1 / math.sqrt(hs))
            dq[:, :, s0:] += gq
        dk, dv = (t.view(B, nh, T, K, -1).transpose(2, 3) for t in (dk, dv))  # 2 x (B, nh, K, T, width)
        dbias = dk[..., hs].sum(dim=(0, 3)).to(ctx.bias_dtype) if ctx.has_bias else None  # (nh, K): Σ dS
        return dq[..., :hs].to(q.dtype), dk[..., :hs], dv[..., :hs], dbias, None


def _visible(t0: int, t1: int, s0: int, s1: int, K: int, like):
    """Additive mask for queries at positions [t0, t1) over position-major keys at positions [s0, s1): 0 where
    the key's position s <= t, -inf elsewhere; (t1 - t0, (s1 - s0)·K), the dtype the CPU kernel asks for (q's)."""
    s = torch.arange(s0, s1, device=like.device).repeat_interleave(K)
    t = torch.arange(t0, t1, device=like.device)
    return torch.zeros(t1 - t0, len(s), dtype=like.dtype, device=like.device).masked_fill_(s > t[:, None],
                                                                                            float("-inf"))


def flex_depth_context_attention(q, k, v, dropout_p: float = 0.0, bias=None):
    """torch's flex_attention (compiled) with a block mask over the (T, K*T) tap-major layout: blocks wholly in
    the future of their queries are skipped, the rest masked element-wise. A tap bias is a score_mod (flex
    differentiates captured tensors). CUDA only (no CPU backward in torch)."""
    assert dropout_p == 0.0, "flex_attention has no attention dropout"
    from torch.nn.attention.flex_attention import flex_attention

    B, nh, K, T, hs = k.shape
    block_mask = _tap_block_mask(T, K, str(q.device))
    run = _compiled_flex() if q.device.type == "cuda" else flex_attention  # eager: forward only, for the tests
    score_mod = None
    if bias is not None:
        def score_mod(score, b, h, q_idx, kv_idx):  # key kv_idx = l*T + s belongs to tap l
            return score + bias[h, kv_idx // T].to(score.dtype)
    return run(q, k.flatten(2, 3), v.flatten(2, 3), score_mod=score_mod, block_mask=block_mask)  # (B, nh, T, hs)


@functools.cache
def _tap_block_mask(T: int, K: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q_idx, kv_idx):  # key kv_idx = l*T + s is position s of tap l
        return kv_idx % T <= q_idx

    return create_block_mask(visible, B=None, H=None, Q_LEN=T, KV_LEN=K * T, device=device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One graph per shape and grad mode (training, eval, each shortcut block's K): torch's default of 8 recompiles
    # is soon reached, and past it flex runs eagerly, materialising every score (tens of GB at T=2048).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


ATTENTION = {AttnImpl.masked: masked_depth_context_attention, AttnImpl.lse: lse_depth_context_attention,
             AttnImpl.flex: flex_depth_context_attention, AttnImpl.chunked: chunked_depth_context_attention}


def runnable_impls(device_type: str) -> list[AttnImpl]:
    """The implementations (auto aside) that run on this kind of device."""
    cuda_only, cpu_only = (AttnImpl.flex,), (AttnImpl.chunked,)
    return [i for i in AttnImpl if i != AttnImpl.auto and (i not in cuda_only or device_type == "cuda")
            and (i not in cpu_only or device_type == "cpu") and (i != AttnImpl.lse or device_type in ("cpu", "cuda"))]


def resolve_attn_impl(impl: AttnImpl, device_type: str) -> AttnImpl:
    """The implementation model.attn_impl names on this device: auto picks the fastest exact one."""
    impl = AttnImpl(impl)
    if impl == AttnImpl.flex and device_type != "cuda":
        raise UserError(f"model.attn_impl=flex needs CUDA (torch's flex_attention has no backward on "
                        f"{device_type}); use auto, chunked, lse or masked")
    if impl == AttnImpl.chunked and device_type != "cpu":
        raise UserError(f"model.attn_impl=chunked runs torch's CPU kernel only, not on {device_type}; "
                        "use auto, lse, flex or masked")
    if impl == AttnImpl.auto:
        # CPU: chunked, measured fastest (benchmarks/attn_impls.py): torch's CPU flash kernel skips the future
        # only in blocks of 512 keys, so a causal call per tap (lse) computes as much as the masked one; chunks of
        # CHUNK positions skip it. CUDA: lse, as FlashAttention-2 skips the future half; an expectation, to be
        # measured against flex and masked by `make gpu-check` (benchmarks/attn_impls.py).
        return AttnImpl.chunked if device_type == "cpu" else AttnImpl.lse
    return impl


# --- over a KV cache (incremental decoding, shortcut.generate): n new queries at positions p.., keys at 0..p+n-1 ---

def _visible_from(p: int, n: int, device) -> torch.Tensor:
    """(n, p + n) bool: query p + j sees key position s iff s <= p + j."""
    return torch.arange(p + n, device=device)[None, :] <= (p + torch.arange(n, device=device))[:, None]


def cached_attention(q, k, v, offset: int, visible=None):
    """Causal self-attention of q (B, nh, n, hs) at positions offset.. over cached k, v (B, nh, offset + n, hs);
    visible (B, 1, n, offset + n) bool, where not every cached position holds a key (a routed block's)."""
    n = q.size(2)
    if visible is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    if n == 1:
        return F.scaled_dot_product_attention(q, k, v)  # one query sees every cached key
    if offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_visible_from(offset, n, q.device))


def cached_depth_context_attention(q, k, v, offset: int, bias=None):
    """q (B, nh, n, hs) at positions offset.. over cached (tap, position) keys and values k, v (B, nh, K,
    offset + n, hs), laid out tap-major as in masked_depth_context_attention; bias (nh, K) or None."""
    n, K, t = q.size(2), k.size(2), k.size(3)
    mask = _visible_from(offset, n, q.device).repeat(1, K)  # (n, K*t): every tap, causal in position
    if bias is not None:
        mask = tap_bias_mask(mask, bias, t).to(q.dtype)  # (nh, n, K*t): b[h, l] or -inf
    return F.scaled_dot_product_attention(q, k.flatten(2, 3), v.flatten(2, 3), attn_mask=mask)  # (B, nh, n, hs)


AUDIT_CHUNK_BYTES = 256 * 2**20


def depth_context_attention_probs(q, k, v, dropout_p: float = 0.0, chunk_bytes: int = AUDIT_CHUNK_BYTES,
                                  bias=None):
    """The reference computation, with its probabilities: y (B, nh, T, hs) and probs (B, nh, T, K, T) float32.

    Queries go c at a time, c = max(1, chunk_bytes // (3·4·B·nh·K·T)), so that beside the returned probs
    (B·nh·T·K·T floats) and one contiguous copy of k and v, the scratch is at most 3·B·nh·c·K·T floats (a
    chunk's scores, softmax and dropout) <= chunk_bytes, 256 MiB by default. Under autograd every chunk's
    softmax is kept for the backward, as in any explicit attention; the audit runs without."""
    B, nh, K, T, hs = k.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    k, v = k.flatten(2, 3).contiguous(), v.flatten(2, 3).contiguous()  # (B, nh, K*T, hs), tap-major
    # Causal in position, every tap visible: query t sees key (l, s) iff s <= t.
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().repeat(1, K)  # (T, K*T)
    per_key = None if bias is None else bias.repeat_interleave(T, dim=1)[:, None, :]  # (nh, 1, K*T) tap bias
    c = max(1, min(T, chunk_bytes // (3 * 4 * B * nh * K * T)))
    probs = torch.zeros(B, nh, T, K * T, dtype=dtype, device=q.device)
    ys = []
    for t0 in range(0, T, c):
        att = (q[:, :, t0:t0 + c] @ k.transpose(-2, -1)).div_(math.sqrt(hs))  # (B, nh, c, K*T), in place: lean
        if per_key is not None:
            att = att + per_key.to(att.dtype)
        att = att.masked_fill_(~mask[t0:t0 + c], float("-inf")).to(dtype).softmax(dim=-1)
        probs[:, :, t0:t0 + c] = att
        ys.append(F.dropout(att, dropout_p).to(v.dtype) @ v)  # (B, nh, c, hs)
    return torch.cat(ys, dim=2), probs.view(B, nh, T, K, T)  # (B, nh, T queries, K taps, T keys)
