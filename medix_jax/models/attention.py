"""Memory-efficient attention described by segment ids and causality, shared by the decoder and the vision tower.

Query ``t`` of row ``b`` attends key ``s`` iff ``q_segment_ids[b, t] == kv_segment_ids[b, s]`` and, when causal,
``s <= t + q_offset``. Id 0 is an ordinary id (padding attends padding, as the old boolean masks did); a [B, T, S]
mask is never passed around, each implementation builds what it needs from the ids. Implementations:

* ``xla``: einsum with a float32 softmax and the mask built at use (the old ``layers.attention``, bit for bit).
* ``blockwise``: plain-JAX online-softmax attention (FlashAttention-2, Dao 2023): a ``custom_vjp`` whose forward
  keeps a running max / sum per query block and stores only the output and the log-sum-exp, and whose backward
  recomputes the scores block by block, so neither pass holds a [T, S] buffer.
* ``splash``: the Pallas TPU splash-attention kernel (``jax.experimental.pallas.ops.tpu.splash_attention``), run
  under ``shard_map`` over the mesh of ``parallel.activation_sharding`` (Pallas TPU kernels compile only there);
  interpreted off TPU (tests).
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, which masks right padding only: each row's
  contiguous run of real tokens is rolled to the front, given as a length, and the output rolled back.

A query row with no attendable key yields a finite value that differs between implementations (padding, never read).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from medix_jax import parallel

IMPLEMENTATIONS = ("auto", "splash", "cudnn", "xla", "blockwise")  # ModelConfig.attention checks the same names
XLA_MAX_SCORES = 2**20  # 'auto' materialises at most this many scores per head (T * S), else goes blockwise
SPLASH_MIN_Q = 128  # on TPU, shorter queries than one splash tile (128 lanes) go to xla
LANES = 128  # splash tiles are multiples of this
_SPLASH_PAD_ID = np.iinfo(np.int32).min  # the segment id of splash's block padding: never a real id


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array | np.ndarray,
              kv_segment_ids: jax.Array | np.ndarray, *, causal: bool, q_offset: int | jax.Array = 0,
              contiguous: bool = False, implementation: str = "auto") -> jax.Array:
    """q ``[B, T, H, D]``; k, v ``[B, S, K, D]`` with ``H`` a multiple of ``K`` (grouped-query); segment ids int32
    ``[B, T]`` / ``[B, S]``. Query t attends key s iff ``q_segment_ids[b, t] == kv_segment_ids[b, s]`` and (not
    causal or ``s <= t + q_offset``).

    q_offset: int or traced int32 scalar (decode: the cache index of the first query); anything but the static 0
    counts as a decode step for ``resolve``. Scale ``D**-0.5``, softmax in float32, output ``[B, T, H, D]`` in
    ``v.dtype``. contiguous=True is the caller's promise that in every row the nonzero segment ids form one
    contiguous run ``[0..0 | s..s | 0..0]`` of a single id, the same in q and kv (decoder rows: left padding, real
    tokens, trailing padding; vision full-attention images: real rows then padding), which the cuDNN path needs;
    there the outputs at id-0 rows are zero instead of padding attending padding.
    """
    b, t, h, d = q.shape
    _, s, kh, _ = k.shape
    if h % kh or v.shape != k.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}: want [B, T, H, D] and [B, S, K, D] "
                         "with H a multiple of K")
    if q_segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s):
        raise ValueError(f"attention: segment ids {q_segment_ids.shape} / {kv_segment_ids.shape}, want {(b, t)} / "
                         f"{(b, s)}")
    decode = not (isinstance(q_offset, (int, np.integer)) and int(q_offset) == 0)
    impl = resolve(implementation, platform=_platform(), q_len=t, kv_len=s, decode=decode, contiguous=contiguous)
    if impl == "cudnn" and implementation == "auto" and q.dtype not in (jnp.bfloat16, jnp.float16):
        impl = _by_size(t, s)  # cuDNN's flash attention takes half precision only
    args = (q, k, v, q_segment_ids, kv_segment_ids)
    if impl == "xla":
        return xla_attention(*args, causal=causal, q_offset=q_offset)
    if impl == "blockwise":
        return blockwise_attention(*args, causal=causal, q_offset=q_offset)
    if impl == "splash":
        return splash_attention(*args, causal=causal)
    return rolled_attention(*args, causal=causal, backend="cudnn")


def resolve(implementation: str, *, platform: str, q_len: int, kv_len: int, decode: bool, contiguous: bool) -> str:
    """The concrete implementation that ``implementation`` means on ``platform`` ('tpu', 'gpu', 'cpu').

    auto: TPU -> 'splash', but for a decode step or ``q_len < 128`` (less than one splash tile) the size rule;
    GPU -> 'cudnn' for contiguous rows that are not a decode step, else the size rule; CPU -> the size rule: 'xla'
    while ``q_len * kv_len`` is at most ``XLA_MAX_SCORES`` (2**20, e.g. 1024 x 1024), 'blockwise' above. An
    explicit choice is returned unchanged, except 'splash' on a decode step (a traced offset has no static splash
    mask; one query row would fill a 128-row tile), which falls back to the size rule, and 'cudnn' on a decode step
    or non-contiguous rows, a ValueError.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: choose one of {IMPLEMENTATIONS}")
    by_size = _by_size(q_len, kv_len)
    if implementation == "auto":
        if platform == "tpu":
            return by_size if decode or q_len < SPLASH_MIN_Q else "splash"
        if platform in ("gpu", "cuda"):
            return "cudnn" if contiguous and not decode else by_size
        return by_size
    if implementation == "splash" and decode:
        return by_size
    if implementation == "cudnn" and (decode or not contiguous):
        raise ValueError("attention implementation 'cudnn' needs contiguous=True rows (one run of real tokens) and "
                         "no q_offset (not a decode step): use 'auto', 'xla' or 'blockwise' here")
    return implementation


def _by_size(q_len: int, kv_len: int) -> str:
    return "xla" if q_len * kv_len <= XLA_MAX_SCORES else "blockwise"


def _platform() -> str:
    """The platform of the enclosing ``activation_sharding`` mesh, else of the default backend."""
    context = parallel.current_mesh()
    return context[0].devices.flat[0].platform if context is not None else jax.default_backend()


def _pair_mask(q_ids, kv_ids, q_pos, kv_pos, causal: bool, q_offset):
    """``[B, Tq, Sk]``: same segment and (causal) ``kv_pos <= q_pos + q_offset``; positions are 1-d."""
    mask = q_ids[:, :, None] == kv_ids[:, None, :]
    if causal:
        mask &= kv_pos[None, None, :] <= q_pos[None, :, None] + q_offset
    return mask


# ---------------------------------------------------------------------------------------------------------------
# xla


def xla_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, q_offset=0) -> jax.Array:
    """Einsum attention over the full [T, S] scores (small shapes); a row with nothing to attend to averages."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    mask = _pair_mask(q_segment_ids, kv_segment_ids, jnp.arange(t), jnp.arange(s), causal, q_offset)
    q = q.reshape(b, t, kh, h // kh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


# ---------------------------------------------------------------------------------------------------------------
# ragged decode (continuous batching)

DECODE_BLOCK = 256  # keys per block of ``ragged_decode_attention``


def ragged_decode_attention(q, k, v, q_segment_ids, kv_segment_ids, lengths, block_kv: int = DECODE_BLOCK):
    """One query per row over the first ``lengths[b]`` keys of its cache row only: q ``[B, 1, H, D]``, k, v
    ``[B, S, K, D]``, ``lengths`` int32 ``[B]``. Key s is attended iff ``s < lengths[b]`` and its segment id equals
    the query's. Online softmax (FlashAttention-2) over blocks of ``block_kv`` keys, with a traced trip count: only
    the blocks up to the longest row's length are read, not the whole preallocated cache. A masked score is the
    float32 minimum, so a block with no valid key is wiped out by the first block that has one (every row has its
    own token). Output ``[B, 1, H, D]`` in ``v.dtype``."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if t != 1:
        raise ValueError(f"ragged_decode_attention: one query per row, got {t}")
    bk = min(block_kv, s)
    sp = -(-s // bk) * bk
    k, v, kv_ids = _pad_axis(k, 1, sp), _pad_axis(v, 1, sp), _pad_axis(kv_segment_ids, 1, sp)
    qg = q.reshape(b, kh, h // kh, d)
    lowest = jnp.finfo(jnp.float32).min

    def step(j, carry):
        top, total, acc = carry
        kj, vj = (lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1) for x in (k, v))
        ids = lax.dynamic_slice_in_dim(kv_ids, j * bk, bk, axis=1)
        valid = (ids == q_segment_ids[:, :1]) & (j * bk + jnp.arange(bk)[None] < lengths[:, None])
        scores = jnp.einsum("bkgd,bskd->bkgs", qg, kj, preferred_element_type=jnp.float32) * (d**-0.5)
        scores = jnp.where(valid[:, None, None], scores, lowest)
        new_top = jnp.maximum(top, scores.max(-1))
        probs = jnp.exp(scores - new_top[..., None])
        scale = jnp.exp(top - new_top)
        acc = acc * scale[..., None] + jnp.einsum("bkgs,bskd->bkgd", probs.astype(v.dtype), vj,
                                                  preferred_element_type=jnp.float32)
        return new_top, total * scale + probs.sum(-1), acc

    init = (jnp.full((b, kh, h // kh), lowest), jnp.zeros((b, kh, h // kh)), jnp.zeros((b, kh, h // kh, d)))
    blocks = (jnp.max(lengths) + bk - 1) // bk
    _, total, acc = lax.fori_loop(0, blocks, step, init)
    return (acc / total[..., None]).astype(v.dtype).reshape(b, 1, h, d)


# ---------------------------------------------------------------------------------------------------------------
# blockwise (FlashAttention-2 in plain JAX)


def blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, q_offset=0, block_q: int = 512,
                        block_kv: int = 512) -> jax.Array:
    """Online-softmax attention in blocks of ``block_q`` queries x ``block_kv`` keys (clipped to the lengths; the
    sequences are padded to block multiples inside). K/V heads are never repeated: q is viewed as [B, T, K, G, D].
    Causal key blocks past the last query of a block are skipped (a loop with a traced trip count)."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = min(block_q, t), min(block_kv, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    qg = _pad_axis(q.reshape(b, t, kh, h // kh, d), 1, tp)
    k, v = _pad_axis(k, 1, sp), _pad_axis(v, 1, sp)
    q_ids, kv_ids = _pad_axis(q_segment_ids, 1, tp), _pad_axis(kv_segment_ids, 1, sp)
    offset = jnp.asarray(q_offset, jnp.int32)
    out = _flash(qg, k, v, q_ids, kv_ids, offset, causal, bq, bk, s)
    return out[:, :t].reshape(b, t, h, d)


def _pad_axis(x, axis: int, size: int, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _block(x, i, size: int):
    return lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _kv_blocks(i, offset, causal: bool, bq: int, bk: int, nk: int):
    """How many key blocks query block ``i`` needs (causal: up to its last query's position)."""
    if not causal:
        return nk
    return jnp.clip(((i + 1) * bq - 1 + offset) // bk + 1, 0, nk)


def _first_q_block(j, offset, causal: bool, bq: int, bk: int, nq: int):
    """The first query block that sees key block ``j`` (causal: whose last query reaches the block's first key)."""
    if not causal:
        return 0
    return jnp.clip((j * bk - offset) // bq, 0, nq)


def _scores(qi, kj, ids_q, ids_k, i, j, offset, causal, bq, bk, kv_len):
    """Scaled float32 scores ``[B, K, G, bq, bk]`` of query block i x key block j and their mask."""
    d = qi.shape[-1]
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * (d**-0.5)
    kv_pos = j * bk + jnp.arange(bk)
    mask = _pair_mask(ids_q, ids_k, i * bq + jnp.arange(bq), kv_pos, causal, offset)
    mask &= (kv_pos < kv_len)[None, None, :]  # block padding of the keys
    return scores, mask[:, None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, q_ids, kv_ids, offset, causal: bool, bq: int, bk: int, kv_len: int):
    return _flash_forward(q, k, v, q_ids, kv_ids, offset, causal, bq, bk, kv_len)[0]


def _flash_forward(q, k, v, q_ids, kv_ids, offset, causal, bq, bk, kv_len):
    """(out [B, Tp, K, G, D] in v.dtype, log-sum-exp [B, K, G, Tp] float32; +inf where a row has no key)."""
    nq, nk = q.shape[1] // bq, k.shape[1] // bk
    b, _, kh, g, d = q.shape

    def query_block(i):
        qi, ids_q = _block(q, i, bq), _block(q_ids, i, bq)

        def step(j, carry):
            m, total, acc = carry
            scores, mask = _scores(qi, _block(k, j, bk), ids_q, _block(kv_ids, j, bk), i, j, offset, causal, bq, bk,
                                   kv_len)
            scores = jnp.where(mask, scores, -jnp.inf)
            m_new = jnp.maximum(m, scores.max(-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # rows with no key yet: exp(-inf) = 0, not NaN
            p = jnp.exp(scores - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), _block(v, j, bk),
                            preferred_element_type=jnp.float32)
            return m_new, alpha * total + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, d), jnp.float32))
        m, total, acc = lax.fori_loop(0, _kv_blocks(i, offset, causal, bq, bk, nk), step, init)
        empty = total == 0
        total = jnp.where(empty, 1.0, total)
        out = acc / total[..., None]
        lse = jnp.where(empty, jnp.inf, m + jnp.log(total))
        return out.astype(v.dtype), lse

    out, lse = lax.map(query_block, jnp.arange(nq))  # [nq, B, K, G, bq, D], [nq, B, K, G, bq]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(q.shape)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, kh, g, nq * bq)
    return out, lse


def _flash_fwd(q, k, v, q_ids, kv_ids, offset, causal, bq, bk, kv_len):
    out, lse = _flash_forward(q, k, v, q_ids, kv_ids, offset, causal, bq, bk, kv_len)
    return out, (q, k, v, q_ids, kv_ids, offset, out, lse)


def _flash_bwd(causal, bq, bk, kv_len, residuals, dout):
    """FlashAttention-2 backward: per key block, loop over the query blocks that see it, recompute the
    probabilities from the stored log-sum-exp, accumulate dK/dV locally and add each block's dQ in place."""
    q, k, v, q_ids, kv_ids, offset, out, lse = residuals
    nq, nk = q.shape[1] // bq, k.shape[1] // bk
    b, _, kh, g, d = q.shape
    scale = d**-0.5
    delta = jnp.einsum("btkgd,btkgd->bkgt", dout.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(dq, j):
        kj, vj, ids_k = _block(k, j, bk), _block(v, j, bk), _block(kv_ids, j, bk)

        def step(i, carry):
            dq, dk, dv = carry
            qi, doi = _block(q, i, bq), _block(dout, i, bq)
            scores, mask = _scores(qi, kj, _block(q_ids, i, bq), ids_k, i, j, offset, causal, bq, bk, kv_len)
            lse_i = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
            delta_i = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
            p = jnp.where(mask, jnp.exp(scores - lse_i[..., None]), 0.0)
            dv += jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dout.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None])).astype(q.dtype)
            dk += jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32) * scale
            dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32) * scale
            dq = lax.dynamic_update_slice_in_dim(dq, _block(dq, i, bq) + dq_i, i * bq, axis=1)
            return dq, dk, dv

        zeros = jnp.zeros((b, bk, kh, d), jnp.float32)
        lo = _first_q_block(j, offset, causal, bq, bk, nq)
        dq, dk, dv = lax.fori_loop(lo, nq, step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(k.shape)
    dv = dv.transpose(1, 0, 2, 3, 4).reshape(v.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------------------------
# splash (Pallas TPU)


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, block_q: int = 512,
                     block_kv: int = 512, interpret: bool | None = None) -> jax.Array:
    """The splash kernel (no q_offset: decode steps never come here). Under ``parallel.activation_sharding`` it runs
    in ``shard_map`` with the batch split by the ``batch`` rule and heads by ``act_heads`` / ``act_kv_heads`` (both
    left whole unless they split alike, so each device keeps whole query groups with their kv head); without a
    mesh it is called directly. ``interpret`` defaults to True off TPU."""
    context = parallel.current_mesh()
    if interpret is None:
        interpret = _platform() != "tpu"
    local = functools.partial(_splash_local, causal=causal, block_q=block_q, block_kv=block_kv, interpret=interpret)
    if context is None:
        return local(q, k, v, q_segment_ids, kv_segment_ids)
    mesh, rules = context
    q_spec = parallel.logical_spec(("batch", None, "act_heads", None), q.shape, mesh, rules)
    kv_spec = parallel.logical_spec(("batch", None, "act_kv_heads", None), k.shape, mesh, rules)
    if q_spec[2] != kv_spec[2]:
        q_spec = PartitionSpec(q_spec[0], None, None, None)
        kv_spec = PartitionSpec(kv_spec[0], None, None, None)
    ids_spec = PartitionSpec(q_spec[0], None)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec),
                            out_specs=q_spec, check_vma=False)
    return sharded(q, k, v, q_segment_ids, kv_segment_ids)


def _splash_local(q, k, v, q_ids, kv_ids, *, causal: bool, block_q: int, block_kv: int, interpret: bool):
    """Splash on one device's share. Grouped-query heads use the MQA kernel (G query heads against one kv head),
    vmapped over kv heads and batch, so K/V are never repeated in memory and dK/dV come out per kv head."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    tp, sp = _round_up(t, LANES), _round_up(s, LANES)
    q = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    q = _pad_axis(q, 1, tp).reshape(b, tp, kh, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tp, D]
    k, v = (_pad_axis(x, 1, sp).transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, Sp, D]
    q_ids = _pad_axis(q_ids, 1, tp, _SPLASH_PAD_ID)  # padded rows attend padded keys only: finite, sliced off
    kv_ids = _pad_axis(kv_ids, 1, sp, _SPLASH_PAD_ID)
    kernel = _splash_kernel(tp, sp, g, causal, _tile(tp, block_q), _tile(sp, block_kv), interpret)

    def one_head(q, k, v, q_ids, kv_ids):
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=q_ids, kv=kv_ids))

    per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_row)(q, k, v, q_ids, kv_ids)  # [B, K, G, Tp, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t].astype(v.dtype)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tile(length: int, block: int) -> int:
    """The largest multiple of 128 that is at most ``block`` and divides ``length`` (a multiple of 128)."""
    return next(tile for tile in range(max(block // LANES, 1) * LANES, 0, -LANES) if length % tile == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(tp: int, sp: int, heads: int, causal: bool, bq: int, bk: int, interpret: bool):
    """The kernel for one shape (its block-sparsity tables are built in numpy: cached, and made concrete even when
    first asked for inside a trace, so the cached copy holds no tracer)."""
    with jax.ensure_compile_time_eval():
        return _make_splash_kernel(tp, sp, heads, causal, bq, bk, interpret)


def _make_splash_kernel(tp: int, sp: int, heads: int, causal: bool, bq: int, bk: int, interpret: bool):
    mask = splash.CausalMask((tp, sp)) if causal else splash.FullMask((tp, sp))
    blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                               block_kv_dkv_compute=bk, use_fused_bwd_kernel=True)
    return splash.make_splash_mqa(splash.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


# ---------------------------------------------------------------------------------------------------------------
# cuDNN (right padding only): roll each row's run of real tokens to the front


def rolled_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool,
                     backend: Literal["xla", "cudnn"] = "cudnn") -> jax.Array:
    """``jax.nn.dot_product_attention(implementation=backend)`` on rows whose nonzero ids form one contiguous run
    (``contiguous=True``; for causal, the same run in q and kv): each row is rolled left by its leading padding so
    the run starts at 0 (a roll keeps the causal order), the run lengths become ``query_seq_lengths`` /
    ``key_value_seq_lengths``, and the output is rolled back. Outputs at id-0 rows are zero."""
    q_lead, q_len = _run(q_segment_ids)
    kv_lead, kv_len = _run(kv_segment_ids)
    q, k, v = _roll_rows(q, -q_lead), _roll_rows(k, -kv_lead), _roll_rows(v, -kv_lead)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=jnp.maximum(q_len, 1),
                                       key_value_seq_lengths=jnp.maximum(kv_len, 1), implementation=backend)
    return _roll_rows(out, q_lead).astype(v.dtype)


def _run(ids):
    """(start, length) of each row's run of nonzero ids, int32 ``[B]`` (0, 0 for an all-padding row)."""
    real = ids != 0
    return jnp.argmax(real, axis=1).astype(jnp.int32), real.sum(axis=1, dtype=jnp.int32)


def _roll_rows(x, shift):
    """``x[b]`` rolled by ``shift[b]`` along axis 1 (``jnp.roll`` per row)."""
    n = x.shape[1]
    index = (jnp.arange(n)[None, :] - shift[:, None]) % n
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)
