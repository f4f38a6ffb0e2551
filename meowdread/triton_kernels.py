"""Triton kernels of ``kernels: fused`` on a GPU: the rotary embedding of a fused ``qkv`` row, and SwiGLU.

Each replaces a chain of PyTorch's elementwise kernels with one pass over memory: the rotary embedding of
queries and keys in transformers' Phi-3 is about ten kernels a layer forward (``rotate_half``'s slices, ``neg``
and ``cat``, four ``mul``, two ``add``, the pass-through ``cat``), most of them strided (its queries are
transposed views), and the backward of the three slices of ``qkv`` fills and adds three full-width
buffers. Here one kernel reads ``qkv`` and writes the rotated queries and keys and the values, and one kernel
writes the whole gradient of ``qkv``. SwiGLU (``up * silu(gate)`` on the two halves of ``gate_up_proj``'s
output) is one kernel each way. The sampling engine (:mod:`meowdread.fast_generation`) calls the same
rotary kernel with cache slots: each decode step's rotation and KV-cache write in one kernel.

The math is in fp32 and rounded once at the store. :mod:`meowdread.fused` holds the autograd functions and a
PyTorch version of each kernel (used off the GPU, and the reference of ``tests/test_fused.py``, which also runs
these kernels on the CPU in Triton's interpreter, as ``tests/test_generation.py`` runs the engine's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src, s_b, s_h, s_t, dst, d_b, d_h, d_t, b, t, t_dst, c1, c2, s1, s2, n_heads,
    D: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    """Token ``t``'s ``n_heads`` heads of ``src`` rotated (backward: rotated back) into position ``t_dst`` of
    ``dst``; strides (batch, head, token), the last dimension contiguous in both."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    heads = h < n_heads
    inside = heads & (d < HALF)
    row = src + b * s_b + t * s_t + h * s_h
    out = dst + b * d_b + t_dst * d_t + h * d_h
    x1 = tl.load(row + d, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF + d, mask=inside, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the rotation: sin's sign flips
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(out + d, y1.to(dst.dtype.element_ty), mask=inside)
    tl.store(out + HALF + d, y2.to(dst.dtype.element_ty), mask=inside)
    if D > ROT:  # partial rotary: the dimensions past ROT pass through
        p = tl.arange(0, BLOCK_PASS)[None, :]
        rest = heads & (p < D - ROT)
        tl.store(out + ROT + p, tl.load(row + ROT + p, mask=rest, other=0.0), mask=rest)


@triton.jit
def _copy_heads(src, s_b, s_h, s_t, dst, d_b, d_h, d_t, b, t, t_dst, n_heads, D: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    inside = (h < n_heads) & (d < D)
    x = tl.load(src + b * s_b + t * s_t + h * s_h + d, mask=inside)
    tl.store(dst + b * d_b + t_dst * d_t + h * d_h + d, x, mask=inside)


# The token count changes with every batch: one compiled kernel for all of them, not one per divisibility
# class (Triton specialises integer arguments by default), so a first fit compiles each kernel once.
@triton.jit(do_not_specialize=["T"])
def _rotary_qkv_kernel(
    q, q_b, q_h, q_t, k, k_b, k_h, k_t, v, v_b, v_h, v_t,
    oq, oq_b, oq_h, oq_t, ok, ok_b, ok_h, ok_t, ov, ov_b, ov_h, ov_t, slots,
    cos, sin, c_b, c_t, T, N_Q, N_KV,
    D: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr, SLOTS: tl.constexpr,
):  # fmt: skip
    """One token (program ``b * T + t``): its query and key heads rotated, its value heads copied, each into
    its destination (``oq``, ``ok``, ``ov``; keys and values at position ``slots[t]`` when ``SLOTS``)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    d = tl.arange(0, BLOCK_HALF)[None, :]
    half = d < HALF
    trig = b * c_b + t * c_t
    c1 = tl.load(cos + trig + d, mask=half, other=0.0).to(tl.float32)
    c2 = tl.load(cos + trig + HALF + d, mask=half, other=0.0).to(tl.float32)
    s1 = tl.load(sin + trig + d, mask=half, other=0.0).to(tl.float32)
    s2 = tl.load(sin + trig + HALF + d, mask=half, other=0.0).to(tl.float32)
    if SLOTS:
        slot = tl.load(slots + t).to(tl.int64)
    else:
        slot = t
    _rotate_heads(q, q_b, q_h, q_t, oq, oq_b, oq_h, oq_t, b, t, t, c1, c2, s1, s2, N_Q,
                  D, HALF, ROT, BLOCK_Q, BLOCK_HALF, BLOCK_PASS, BACKWARD)  # fmt: skip
    _rotate_heads(k, k_b, k_h, k_t, ok, ok_b, ok_h, ok_t, b, t, slot, c1, c2, s1, s2, N_KV,
                  D, HALF, ROT, BLOCK_KV, BLOCK_HALF, BLOCK_PASS, BACKWARD)  # fmt: skip
    _copy_heads(v, v_b, v_h, v_t, ov, ov_b, ov_h, ov_t, b, t, slot, N_KV, D, BLOCK_KV, BLOCK_D)


def _strides(x):
    return x, x.stride(0), x.stride(1), x.stride(2)


def rotate_into(q, k, v, cos, sin, out_q, out_k, out_v, slots=None, backward: bool = False) -> None:
    """Rotate ``q`` and ``k`` (or, ``backward``, rotate gradients back) and copy ``v`` into ``out_q``,
    ``out_k``, ``out_v``. All are (batch, heads, tokens, head_dim), any strides with the last one 1; ``cos``
    and ``sin`` are (batch or 1, tokens, rotary_dim). With ``slots`` (tokens,), token ``t``'s keys and values
    go to position ``slots[t]`` of ``out_k`` and ``out_v`` (a KV cache)."""
    batch, n_q, tokens, dim = q.shape
    n_kv, rot = k.shape[1], cos.shape[-1]
    if batch * tokens == 0:
        return
    cos, sin = cos.expand(batch, tokens, rot), sin.expand(batch, tokens, rot)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    half = rot // 2
    _rotary_qkv_kernel[(batch * tokens,)](
        *_strides(q), *_strides(k), *_strides(v), *_strides(out_q), *_strides(out_k), *_strides(out_v),
        q if slots is None else slots, cos, sin, cos.stride(0), cos.stride(1), tokens, n_q, n_kv,
        D=dim, HALF=half, ROT=rot,
        BLOCK_Q=triton.next_power_of_2(n_q), BLOCK_KV=triton.next_power_of_2(n_kv),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_PASS=triton.next_power_of_2(max(dim - rot, 1)),
        BLOCK_D=triton.next_power_of_2(dim), BACKWARD=backward, SLOTS=slots is not None,
    )  # fmt: skip


def rotary_qkv(q, k, v, cos, sin, backward: bool = False) -> torch.Tensor:
    """:func:`rotate_into` one new (batch, tokens, width) tensor in ``qkv_proj``'s layout (queries, keys,
    values), which it returns."""
    from meowdread.fused import split_heads

    batch, n_q, tokens, dim = q.shape
    n_kv = k.shape[1]
    dst = torch.empty(batch, tokens, (n_q + 2 * n_kv) * dim, dtype=q.dtype, device=q.device)
    rotate_into(q, k, v, cos, sin, *split_heads(dst, n_q, n_kv, dim), backward=backward)
    return dst


@triton.jit
def _silu_mul_kernel(src, grad, dst, WIDTH, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    """Row ``program_id(0)``, columns of block ``program_id(1)``: ``up * silu(gate)`` for ``src`` = [gate | up]
    (``WIDTH`` each), or backward, the gradient of ``src`` from ``grad`` (``WIDTH``)."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = col < WIDTH
    gate = tl.load(src + row * 2 * WIDTH + col, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(src + row * 2 * WIDTH + WIDTH + col, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    if BACKWARD:
        g = tl.load(grad + row * WIDTH + col, mask=inside, other=0.0).to(tl.float32)
        d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(dst + row * 2 * WIDTH + col, d_gate.to(dst.dtype.element_ty), mask=inside)
        tl.store(dst + row * 2 * WIDTH + WIDTH + col, (g * silu).to(dst.dtype.element_ty), mask=inside)
    else:
        tl.store(dst + row * WIDTH + col, (up * silu).to(dst.dtype.element_ty), mask=inside)


_SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``up * silu(gate)`` of a contiguous (rows, 2I) ``gate_up``: (rows, I)."""
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        grid = (rows, triton.cdiv(width // 2, _SILU_BLOCK))
        _silu_mul_kernel[grid](gate_up, gate_up, out, width // 2, BLOCK=_SILU_BLOCK, BACKWARD=False)
    return out


def silu_mul_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`silu_mul`'s input, from contiguous ``grad`` (rows, I)."""
    rows, width = gate_up.shape
    out = torch.empty_like(gate_up)
    if rows:
        grid = (rows, triton.cdiv(width // 2, _SILU_BLOCK))
        _silu_mul_kernel[grid](gate_up, grad, out, width // 2, BLOCK=_SILU_BLOCK, BACKWARD=True)
    return out
