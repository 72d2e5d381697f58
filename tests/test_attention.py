"""medix_jax.models.attention against the boolean-mask einsum attention the model used before it: outputs and
gradients of every implementation (splash interpreted, cuDNN's roll logic on jax's xla backend) on decoder, decode
and vision layouts, memory of the blockwise backward, the auto table, and splash under shard_map on 8 CPU
devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medix_jax import parallel
from medix_jax.models import attention as attn

TOL = dict(rtol=2e-5, atol=2e-5)


def einsum_attention(q, k, v, mask):
    """The model's attention before segment ids (the reference): grouped KV heads, boolean mask ``[B, T, S]``,
    float32 softmax; a query row with nothing to attend to yields a uniform average."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)
IMPLS = ["xla", "blockwise", "splash", "cudnn_roll"]


def segments(rows: list[list[tuple[int, int]]]) -> np.ndarray:
    """int32 ``[B, T]`` from per-row runs ``(id, count)``."""
    return np.array([np.concatenate([np.full(n, i) for i, n in row]) for row in rows], np.int32)


def reference_mask(q_ids, kv_ids, causal: bool, offset: int = 0) -> np.ndarray:
    mask = q_ids[:, :, None] == kv_ids[:, None, :]
    if causal:
        mask &= np.arange(kv_ids.shape[1])[None, None, :] <= np.arange(q_ids.shape[1])[None, :, None] + offset
    return mask


def qkv(rng, b, t, s, h, kh, d=16):
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                 [(b, t, h, d), (b, s, kh, d), (b, s, kh, d)])


def out_and_grads(fn, q, k, v, q_ids, kv_ids, cotangent, *extra):
    """(output, (dq, dk, dv)) of ``fn`` under jit; ``extra`` (e.g. a decode offset) are traced arguments."""

    @jax.jit
    def run(q, k, v, q_ids, kv_ids, cotangent, *extra):
        out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, q_ids, kv_ids, *extra), q, k, v)
        return out, pull(cotangent)

    return run(q, k, v, q_ids, kv_ids, cotangent, *extra)


def check(fn, q, k, v, q_ids, kv_ids, *, causal: bool, offset: int = 0, rows=None, traced_offset=False, seed=1):
    """``fn`` equals the reference on query rows with an attendable key (and ``rows``), in outputs and in the
    gradients of ``sum(out * cotangent)`` with the cotangent zero elsewhere."""
    mask = reference_mask(q_ids, kv_ids, causal, offset)
    valid = mask.any(-1) if rows is None else mask.any(-1) & rows
    assert valid.any()
    cotangent = np.random.default_rng(seed).standard_normal(q.shape).astype(np.float32) * valid[:, :, None, None]
    ids = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
    want, want_grads = out_and_grads(lambda q, k, v, *_: einsum_attention(q, k, v, jnp.asarray(mask)), q, k, v,
                                     *ids, cotangent)
    extra = (jnp.int32(offset),) if traced_offset else ()
    got, got_grads = out_and_grads(fn, q, k, v, *ids, cotangent, *extra)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], **TOL)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL, err_msg=f"d{name}")


def implementation(name: str, *, causal: bool, contiguous: bool = False, blocks=(16, 16), traced_offset=False):
    """``fn(q, k, v, q_ids, kv_ids[, offset])`` for one implementation (small blocks, splash tiles of 128)."""
    if name == "blockwise":
        kw = dict(block_q=blocks[0], block_kv=blocks[1])
        fn = functools.partial(attn.blockwise_attention, causal=causal, **kw)
    elif name == "splash":
        fn = functools.partial(attn.splash_attention, causal=causal, block_q=128, block_kv=128)
    elif name == "cudnn_roll":
        fn = functools.partial(attn.rolled_attention, causal=causal, backend="xla")
    else:
        fn = functools.partial(attn.attention, causal=causal, contiguous=contiguous, implementation=name)
    if traced_offset:
        if name == "splash":  # the documented decode fallback, through the public entry point
            fn = functools.partial(attn.attention, causal=causal, implementation="splash")
        return lambda q, k, v, qi, ki, offset: fn(q, k, v, qi, ki, q_offset=offset)
    return fn


# ------------------------------------------------------------------------------------------------------------------
# decoder rows: left padding, real tokens, completion padding


DECODER_ROWS = [[(1, 150)], [(0, 37), (2, 113)], [(0, 20), (3, 100), (0, 30)]]
PACKED_ROWS = [[(0, 10), (1, 60), (2, 50), (0, 30)], [(5, 150)], [(0, 3), (4, 147)]]


@pytest.mark.parametrize("name", IMPLS)
def test_decoder_causal(name):
    ids = segments(DECODER_ROWS)
    q, k, v = qkv(np.random.default_rng(0), 3, 150, 150, 4, 2)
    rows = ids != 0 if name == "cudnn_roll" else None  # cuDNN: padding rows are zero, not padding attending padding
    fn = implementation(name, causal=True, contiguous=True, blocks=(32, 48))
    check(fn, q, k, v, ids, ids, causal=True, rows=rows)


@pytest.mark.parametrize("name", ["xla", "blockwise", "splash"])
def test_packed_segments_causal(name):
    ids = segments(PACKED_ROWS)
    q, k, v = qkv(np.random.default_rng(1), 3, 150, 150, 4, 2)
    check(implementation(name, causal=True, blocks=(48, 32)), q, k, v, ids, ids, causal=True)


def test_xla_is_the_old_attention_bit_for_bit():
    ids = segments(DECODER_ROWS)
    q, k, v = qkv(np.random.default_rng(2), 3, 150, 150, 4, 2)
    want = einsum_attention(q, k, v, jnp.asarray(reference_mask(ids, ids, True)))
    got = attn.attention(q, k, v, jnp.asarray(ids), jnp.asarray(ids), causal=True, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------------------------------------------------------
# decode against a partly filled cache


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("name", ["xla", "blockwise", "splash"])
def test_decode_step(name, t):
    """Queries at cache slots 40.. of a 64-slot cache; every slot after the left padding has id 1 (the unwritten ones
    too), so only causality with the traced offset keeps the future out."""
    offset, pads = 40, [0, 9]
    kv_ids = segments([[(0, p), (1, 64 - p)] for p in pads])
    q_ids = np.ones((2, t), np.int32)
    q, k, v = qkv(np.random.default_rng(3), 2, t, 64, 4, 2)
    fn = implementation(name, causal=True, traced_offset=True, blocks=(16, 16))
    check(fn, q, k, v, q_ids, kv_ids, causal=True, offset=offset, traced_offset=True)


def test_cudnn_refuses_decode_and_scattered_padding():
    q, k, v = qkv(np.random.default_rng(4), 1, 16, 16, 2, 2)
    ids = jnp.ones((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="contiguous"):
        attn.attention(q, k, v, ids, ids, causal=False, implementation="cudnn")
    with pytest.raises(ValueError, match="q_offset"):
        attn.attention(q, k, v, ids, ids, causal=True, q_offset=3, contiguous=True, implementation="cudnn")


@pytest.mark.parametrize("name", IMPLS)
def test_rows_without_keys_stay_finite(name):
    """A query id found in no key (and causal rows before their first key) gives finite outputs and gradients, even
    with a nonzero cotangent there: a NaN in padding would leak through 0 * NaN."""
    q_ids = segments([[(0, 4), (1, 20), (7, 8)], [(1, 32)]])
    kv_ids = segments([[(1, 32)], [(0, 10), (1, 22)]])
    q, k, v = qkv(np.random.default_rng(9), 2, 32, 32, 2, 1)
    fn = implementation(name, causal=True, blocks=(8, 8))
    out, grads = out_and_grads(fn, q, k, v, jnp.asarray(q_ids), jnp.asarray(kv_ids), jnp.ones(q.shape))
    for x in (out, *grads):
        assert np.isfinite(np.asarray(x)).all()


# ------------------------------------------------------------------------------------------------------------------
# vision tower: windows with interleaved padding, full attention over images


@pytest.mark.parametrize("name", ["xla", "blockwise", "splash"])
def test_vision_windows(name):
    """Windows of 16 rows batched as [windows, 16]; pad slots (id 0) inside windows attend pad slots, as the old
    ``valid[:, :, None] == valid[:, None, :]`` mask did."""
    rng = np.random.default_rng(5)
    ids = (rng.random((6, 16)) > 0.25).astype(np.int32)
    ids[0, :] = 1
    ids[1, ::2] = 0
    q, k, v = qkv(rng, 6, 16, 16, 2, 2)
    check(implementation(name, causal=False, blocks=(8, 8)), q, k, v, ids, ids, causal=False)


@pytest.mark.parametrize("name", IMPLS)
def test_vision_full_attention(name):
    """Two images of 48 rows, the first with 8 rows of trailing padding: one image per batch row (contiguous)."""
    ids = segments([[(1, 40), (0, 8)], [(1, 48)]])
    q, k, v = qkv(np.random.default_rng(6), 2, 48, 48, 2, 2)
    rows = ids != 0 if name == "cudnn_roll" else None
    fn = implementation(name, causal=False, contiguous=True, blocks=(16, 32))
    check(fn, q, k, v, ids, ids, causal=False, rows=rows)


@pytest.mark.parametrize("name", ["xla", "blockwise", "splash"])
def test_vision_images_packed(name):
    """The same two images packed into one row by segment ids, padding at the end."""
    ids = segments([[(1, 40), (2, 48), (0, 8)]])
    q, k, v = qkv(np.random.default_rng(7), 1, 96, 96, 2, 2)
    check(implementation(name, causal=False, blocks=(32, 40)), q, k, v, ids, ids, causal=False)


# ------------------------------------------------------------------------------------------------------------------
# memory, dispatch, sharding


def test_blockwise_and_splash_backward_never_hold_the_scores():
    """Compiled temp memory of the gradient at T=S=2048 (splash interpreted: its buffers, not a TPU's VMEM)."""
    b, t, h, d = 1, 2048, 2, 32
    q, k, v = (jax.ShapeDtypeStruct((b, t, h, d), jnp.float32) for _ in range(3))
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp_bytes(name):
        def loss(q, k, v, ids):
            return attn.attention(q, k, v, ids, ids, causal=True, implementation=name).sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    sizes = {name: temp_bytes(name) for name in ("xla", "blockwise", "splash")}
    print(f"grad temp at T=S={t}, H={h}, D={d}:", ", ".join(f"{n} {x / 2**20:.1f} MiB" for n, x in sizes.items()))
    scores = t * t * h * 4  # one float32 [H, T, S] buffer
    assert sizes["xla"] >= scores
    assert sizes["blockwise"] < min(sizes["xla"] / 4, scores)
    assert sizes["splash"] < min(sizes["xla"] / 4, scores)


def test_resolve_table():
    def auto(platform, q_len=4096, kv_len=4096, decode=False, contiguous=False, implementation="auto"):
        return attn.resolve(implementation, platform=platform, q_len=q_len, kv_len=kv_len, decode=decode,
                            contiguous=contiguous)

    assert auto("tpu") == "splash"
    assert auto("tpu", contiguous=True) == "splash"
    assert auto("tpu", q_len=1, decode=True) == "xla"
    assert auto("tpu", q_len=64, kv_len=64) == "xla"
    assert auto("gpu", contiguous=True) == "cudnn"
    assert auto("gpu") == "blockwise"
    assert auto("gpu", q_len=256, kv_len=256) == "xla"
    assert auto("gpu", q_len=1, decode=True, contiguous=True) == "xla"
    assert auto("cpu") == "blockwise"
    assert auto("cpu", q_len=1024, kv_len=1024) == "xla"
    assert auto("cpu", q_len=1024, kv_len=1025) == "blockwise"
    assert auto("cpu", implementation="splash") == "splash"
    assert auto("cpu", implementation="splash", q_len=1, decode=True) == "xla"
    assert auto("tpu", implementation="blockwise", q_len=1, decode=True) == "blockwise"
    assert auto("cpu", implementation="cudnn", contiguous=True) == "cudnn"
    with pytest.raises(ValueError, match="contiguous"):
        auto("gpu", implementation="cudnn")
    with pytest.raises(ValueError, match="choose one of"):
        auto("cpu", implementation="flash")


@pytest.mark.parametrize("kv_heads", [2, 3])
def test_splash_under_shard_map(kv_heads):
    """Splash inside ``activation_sharding`` on data=1 x fsdp=4 x tensor=2: batch over fsdp, heads over tensor (kv
    heads=3 do not split over tensor=2, so both head axes stay whole: split q heads would lose their kv head)."""
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    ids = segments([[(1, 150)], [(0, 37), (2, 113)], [(0, 20), (3, 100), (0, 30)], [(0, 70), (4, 80)]])
    q, k, v = qkv(np.random.default_rng(8), 4, 150, 150, 2 * kv_heads, kv_heads)

    def sharded(q, k, v, q_ids, kv_ids):
        with parallel.activation_sharding(mesh):
            return attn.attention(q, k, v, q_ids, kv_ids, causal=True, implementation="splash")

    check(sharded, q, k, v, ids, ids, causal=True)
