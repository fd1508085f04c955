"""GPU kernels against the pure-PyTorch oracles (run on the device machine; skipped without CUDA).

Errors are relative in the Frobenius norm, ‖x - ref‖ / ‖ref‖, against an fp64 oracle fed the
same (dtype-rounded) inputs. Tolerances: fp32 1e-4 for outputs and gradients; bf16 3e-2
(bf16 keeps 8 mantissa bits: 4e-3 per rounding, and the kernel rounds scores, states and
gradients to bf16 before each tensor-core product, as every bf16 attention kernel does).
"""

from __future__ import annotations

import math

import pytest
import torch

from xmerge.modeling.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
pytest.importorskip("triton")

from xmerge.kernels import mlstm_chunkwise as mk  # noqa: E402
from xmerge.kernels.mlstm_chunkwise import mlstm_chunkwise_triton  # noqa: E402
from xmerge.kernels.swa import swa_attention  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def mlstm_inputs(B, NH, S, DK, DV, dtype, i_scale=3.0, sharpness=1.0, seed=0):
    """Feature-mapped q/k (softmax over features, as the student does), long-memory forget gates."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(B, NH, S, DK, device="cuda", generator=g) * sharpness).softmax(-1)
    k = (torch.randn(B, NH, S, DK, device="cuda", generator=g) * sharpness).softmax(-1)
    v = torch.randn(B, NH, S, DV, device="cuda", generator=g)
    i_pre = torch.randn(B, NH, S, device="cuda", generator=g) * i_scale
    f_pre = torch.randn(B, NH, S, device="cuda", generator=g) + 3.0
    return [x.to(dtype) for x in (q, k, v, i_pre, f_pre)]


def leaves(xs, dtype=None):
    return [x.detach().clone().to(dtype or x.dtype).requires_grad_() for x in xs]


def errors_against_oracle(h, h_ref, xs, refs, final=(), final_ref=()) -> dict[str, float]:
    """Relative errors of h, the final state (C, n, m) when given and, after one backward of the same random
    dh through both, of the gradients of the leaves xs against refs (q, k, v, i, f[, C0, n0, m0])."""
    dh = torch.randn_like(h_ref)
    (h.double() * dh).sum().backward()
    (h_ref * dh).sum().backward()
    errs = {name: rel_err(x, r) for name, x, r in zip(["h", "C", "n", "m"], (h, *final), (h_ref, *final_ref))}
    names = ["q", "k", "v", "i", "f", "C0", "n0", "m0"]
    return errs | {f"d{name}": rel_err(x.grad, r.grad) for name, x, r in zip(names, xs, refs)}


@pytest.fixture
def two_levels_at_any_length(monkeypatch):
    """The two-level tests use short sequences: take two levels below TWO_LEVEL_MIN_TOKENS too."""
    monkeypatch.setattr(mk, "TWO_LEVEL_MIN_TOKENS", 0)


def test_mlstm_two_levels_only_for_few_sequences_and_long_ones():
    """One level wherever the launches' host time bounds a call: many sequences, or short ones."""
    L = 64
    assert mk._segment_ratio(9, mk.TWO_LEVEL_MIN_TOKENS, L) == mk.SUPER_CHUNK // L > 1
    assert mk._segment_ratio(9, mk.TWO_LEVEL_MIN_TOKENS - 1, L) == 1
    assert mk._segment_ratio(mk.TWO_LEVEL_MAX_HEADS + 1, 2 * mk.TWO_LEVEL_MIN_TOKENS, L) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B,NH,S,DK,DV,L",
    [(2, 3, 200, 64, 64, 64), (1, 2, 256, 128, 128, 64), (1, 2, 100, 32, 64, 32), (2, 2, 130, 64, 128, 128)],
)
def test_mlstm_matches_oracle_outputs_and_gradients(dtype, B, NH, S, DK, DV, L):
    xs = leaves(mlstm_inputs(B, NH, S, DK, DV, dtype))
    refs = leaves(xs, torch.float64)
    h, final = mlstm_chunkwise_triton(*xs, chunk_size=L)
    h_ref = mlstm_parallel(*refs)
    with torch.no_grad():
        _, final_ref = mlstm_chunkwise(*refs, chunk_size=L)
    errs = errors_against_oracle(h, h_ref, xs, refs, final, final_ref)
    assert all(e < TOL[dtype] for e in errs.values()), errs
    assert all(torch.isfinite(x.grad).all() for x in xs)


def test_mlstm_gradient_includes_stabiliser_path():
    """Large input gates and sharp features make eps·exp(m) matter; the oracle's gradient flows through max()."""
    xs = leaves(mlstm_inputs(1, 2, 160, 64, 64, torch.float32, i_scale=12.0, sharpness=5.0, seed=3))
    refs = leaves(xs, torch.float64)
    h, _ = mlstm_chunkwise_triton(*xs)
    h_ref = mlstm_parallel(*refs)
    dh = torch.randn_like(h_ref)
    (h.double() * dh).sum().backward()
    (h_ref * dh).sum().backward()
    # the same oracle with m held constant gives visibly different gate gradients
    detached = leaves(refs)
    h_det = _parallel_m_detached(*detached)
    (h_det * dh).sum().backward()
    assert rel_err(detached[3].grad, refs[3].grad) > 1e-2
    for x, r in zip(xs, refs):
        assert rel_err(x.grad, r.grad) < TOL[torch.float32]


def _parallel_m_detached(q, k, v, i_pre, f_pre, eps=1e-6):
    cum = torch.cumsum(torch.nn.functional.logsigmoid(f_pre), dim=-1)
    log_d = cum.unsqueeze(-1) - cum.unsqueeze(-2) + i_pre.unsqueeze(-2)
    causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool, device=q.device).tril()
    log_d = log_d.masked_fill(~causal, float("-inf"))
    m = log_d.amax(dim=-1).detach()
    scores = (q @ k.transpose(-1, -2)) * torch.exp(log_d - m.unsqueeze(-1))
    den = torch.maximum(scores.sum(-1).abs(), torch.exp(-m)) + eps
    return (scores @ v) / den.unsqueeze(-1)


@pytest.mark.usefixtures("two_levels_at_any_length")
@pytest.mark.parametrize("S,cut", [(230, 77), (1300, 600)])  # the second: both pieces take two levels
def test_mlstm_state_passing_prefill_then_decode(S, cut):
    """Kernel prefill in two pieces (not on chunk boundaries), then oracle decode steps == one long run."""
    B, NH, D, steps = 2, 3, 64, 6
    q, k, v, i_pre, f_pre = mlstm_inputs(B, NH, S + steps, D, D, torch.float32, seed=5)
    h_long = mlstm_parallel(q, k, v, i_pre, f_pre)
    h1, state = mlstm_chunkwise_triton(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], i_pre[..., :cut], f_pre[..., :cut])
    sl = slice(cut, S)
    h2, state = mlstm_chunkwise_triton(q[:, :, sl], k[:, :, sl], v[:, :, sl], i_pre[..., sl], f_pre[..., sl], state=state)
    outs = [h1, h2]
    for t in range(S, S + steps):
        h_t, state = mlstm_recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], i_pre[..., t], f_pre[..., t], state)
        outs.append(h_t.unsqueeze(-2))
    assert rel_err(torch.cat(outs, dim=-2), h_long) < TOL[torch.float32]


@pytest.mark.usefixtures("two_levels_at_any_length")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,L", [(600, 64), (555, 16), (1000, 64)])
def test_mlstm_two_level_pass_matches_oracle(dtype, S, L):
    """Past SUPER_CHUNK tokens the state pass is a scan over segments of SUPER_CHUNK tokens (each segment's own
    state, composed, then filled in per chunk): h and the final state against the fp64 oracle; grouped heads,
    an initial state, ragged tails at both levels."""
    B, NH, NKV, D = 1, 4, 2, 64
    assert -(-S // L) > mk.SUPER_CHUNK // L  # more chunks than one segment holds
    q, _, _, i_pre, f_pre = mlstm_inputs(B, NH, S, D, D, dtype, seed=21)
    _, k, v, _, _ = mlstm_inputs(B, NKV, S, D, D, dtype, seed=22)
    g = torch.Generator(device="cuda").manual_seed(23)
    state = (torch.rand(B, NH, D, D, device="cuda", generator=g), torch.rand(B, NH, D, device="cuda", generator=g),
             torch.randn(B, NH, device="cuda", generator=g) + 2.0)
    with torch.no_grad():
        h, (C, n, m) = mlstm_chunkwise_triton(q, k, v, i_pre, f_pre, state=state, chunk_size=L)
    wide = [x.double() for x in (q, k.repeat_interleave(NH // NKV, 1), v.repeat_interleave(NH // NKV, 1), i_pre, f_pre)]
    h_ref, (C_ref, n_ref, m_ref) = mlstm_chunkwise(*wide, state=tuple(x.double() for x in state), chunk_size=L)
    errs = {"h": rel_err(h, h_ref), "C": rel_err(C, C_ref), "n": rel_err(n, n_ref), "m": rel_err(m, m_ref)}
    assert all(e < TOL[dtype] for e in errs.values()), errs


@pytest.mark.usefixtures("two_levels_at_any_length")
@pytest.mark.parametrize(  # the last: large gates and sharp features make eps·exp(m) matter (fp32 sees it)
    "dtype,i_scale,sharpness", [(torch.float32, 3.0, 1.0), (torch.bfloat16, 3.0, 1.0), (torch.float32, 12.0, 5.0)]
)
def test_mlstm_two_level_pass_gradients_match_oracle(dtype, i_scale, sharpness):
    """Training takes the two-level state pass too: its m sequence is rounded differently where segments
    meet, and the backward must still route the stabiliser gradient. Grouped heads, a ragged tail."""
    B, NH, NKV, S, D, L = 1, 4, 2, 700, 64, 32
    assert -(-S // L) > mk.SUPER_CHUNK // L > 1
    q, _, _, i_pre, f_pre = mlstm_inputs(B, NH, S, D, D, dtype, i_scale, sharpness, seed=31)
    _, k, v, _, _ = mlstm_inputs(B, NKV, S, D, D, dtype, i_scale, sharpness, seed=32)
    xs = leaves([q, k, v, i_pre, f_pre])
    refs = leaves(xs, torch.float64)
    h, _ = mlstm_chunkwise_triton(*xs, chunk_size=L)
    rep = NH // NKV
    h_ref = mlstm_parallel(refs[0], refs[1].repeat_interleave(rep, 1), refs[2].repeat_interleave(rep, 1), *refs[3:])
    errs = errors_against_oracle(h, h_ref, xs, refs)
    assert all(e < TOL[dtype] for e in errs.values()), errs


@pytest.mark.usefixtures("two_levels_at_any_length")
@pytest.mark.parametrize("dtype,init", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_mlstm_segment_scan_over_several_groups(monkeypatch, dtype, init):
    """Segments of two chunks: 35 segments, so the scan composes three groups of SCAN_GROUP (the last ragged)
    and carries state and gradient across; the first 100 tokens padded (ĩ = -inf): without an initial state
    the first segments hold no mass (a -inf stabiliser into the scan). Everything against the fp64 oracle."""
    B, NH, S, D, L = 1, 2, 1100, 32, 16
    monkeypatch.setattr(mk, "SUPER_CHUNK", 2 * L)
    assert 2 * mk.SCAN_GROUP < -(-S // (2 * L)) < 3 * mk.SCAN_GROUP
    q, k, v, i_pre, f_pre = mlstm_inputs(B, NH, S, D, D, dtype, seed=41)
    i_pre[..., :100] = float("-inf")
    state = []
    if init:
        g = torch.Generator(device="cuda").manual_seed(42)
        state = leaves([torch.rand(B, NH, D, D, device="cuda", generator=g),
                        torch.rand(B, NH, D, device="cuda", generator=g),
                        torch.randn(B, NH, device="cuda", generator=g) + 2.0])
    xs = leaves([q, k, v, i_pre, f_pre])
    refs, state_ref = leaves(xs, torch.float64), leaves(state, torch.float64)
    h, final = mlstm_chunkwise_triton(*xs, state=tuple(state) or None, chunk_size=L)
    h_ref, final_ref = mlstm_chunkwise(*refs, state=tuple(state_ref) or None, chunk_size=L)
    errs = errors_against_oracle(h, h_ref, xs + state, refs + state_ref, final, final_ref)
    assert all(e < TOL[dtype] for e in errs.values()), errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlstm_initial_state_gradients(dtype):
    B, NH, S, D = 1, 2, 150, 64
    xs = leaves(mlstm_inputs(B, NH, S, D, D, dtype, seed=7))
    g = torch.Generator(device="cuda").manual_seed(8)
    state = leaves([
        torch.rand(B, NH, D, D, device="cuda", generator=g),
        torch.rand(B, NH, D, device="cuda", generator=g),
        torch.randn(B, NH, device="cuda", generator=g) + 2.0,
    ])
    refs, state_ref = leaves(xs, torch.float64), leaves(state, torch.float64)
    h, _ = mlstm_chunkwise_triton(*xs, state=tuple(state))
    h_ref, _ = mlstm_chunkwise(*refs, state=tuple(state_ref))
    errs = errors_against_oracle(h, h_ref, xs + state, refs + state_ref)
    assert all(e < TOL[dtype] for e in errs.values()), errs


def test_mlstm_left_padding_gives_zero_rows_and_no_nan():
    B, NH, S, D, pad = 2, 2, 140, 64, 37
    xs = mlstm_inputs(B, NH, S, D, D, torch.float32, seed=9)
    xs[3][..., :pad] = float("-inf")
    xs = leaves(xs)
    h, (C, n, m) = mlstm_chunkwise_triton(*xs)
    tail = leaves([x[..., pad:, :] if x.dim() == 4 else x[..., pad:] for x in xs])
    h_tail, (C_t, n_t, m_t) = mlstm_chunkwise_triton(*tail)
    assert torch.equal(h[..., :pad, :], torch.zeros_like(h[..., :pad, :]))
    assert rel_err(h[..., pad:, :], h_tail) < 1e-5 and rel_err(C, C_t) < 1e-5 and rel_err(m, m_t) < 1e-6
    (h * torch.randn_like(h)).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)
    assert torch.equal(xs[3].grad[..., :pad], torch.zeros_like(xs[3].grad[..., :pad]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlstm_grouped_heads_and_strided_gates_match_repeated_oracle(dtype):
    """k, v with fewer heads than q (read in place, no copy), gates seen through a transpose as the
    student builds them: outputs and gradients (dk, dv summed over each group) against the oracle."""
    B, NH, NKV, S, D = 2, 6, 2, 180, 64
    q, _, _, i_pre, f_pre = mlstm_inputs(B, NH, S, D, D, dtype, seed=12)
    _, k, v, _, _ = mlstm_inputs(B, NKV, S, D, D, dtype, seed=13)
    i_pre, f_pre = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (i_pre, f_pre))
    xs = leaves([q, k, v, i_pre, f_pre])
    refs = leaves(xs, torch.float64)
    h, (C, n, m) = mlstm_chunkwise_triton(*xs)
    rep = NH // NKV
    h_ref, (C_ref, n_ref, m_ref) = mlstm_chunkwise(
        refs[0], refs[1].repeat_interleave(rep, 1), refs[2].repeat_interleave(rep, 1), refs[3], refs[4], chunk_size=64
    )
    dh = torch.randn_like(h_ref)
    (h.double() * dh).sum().backward()
    (h_ref * dh).sum().backward()
    errs = {"h": rel_err(h, h_ref), "C": rel_err(C, C_ref), "m": rel_err(m, m_ref)}
    errs |= {f"d{name}": rel_err(x.grad, r.grad) for name, x, r in zip(["q", "k", "v", "i", "f"], xs, refs)}
    assert xs[1].grad.shape == (B, NKV, S, D)
    assert all(e < TOL[dtype] for e in errs.values()), errs


def test_mlstm_stabiliser_gradient_through_the_chunk_chain_and_initial_state():
    """Sharp gates over many short chunks with an initial state: the stabiliser's gradient runs
    back through the chunk-start maxima to ĩ, f̃ and m0 (reverse pass), checked against the oracle."""
    B, NH, S, D, L = 1, 2, 300, 64, 16
    xs = leaves(mlstm_inputs(B, NH, S, D, D, torch.float32, i_scale=12.0, sharpness=5.0, seed=14))
    g = torch.Generator(device="cuda").manual_seed(15)
    state = leaves([
        torch.rand(B, NH, D, D, device="cuda", generator=g),
        torch.rand(B, NH, D, device="cuda", generator=g),
        torch.randn(B, NH, device="cuda", generator=g) * 4 + 10.0,
    ])
    refs, state_ref = leaves(xs, torch.float64), leaves(state, torch.float64)
    h, _ = mlstm_chunkwise_triton(*xs, state=tuple(state), chunk_size=L)
    h_ref = mlstm_chunkwise(*refs, state=tuple(state_ref), chunk_size=L)[0]
    errs = errors_against_oracle(h, h_ref, xs + state, refs + state_ref)
    assert all(e < TOL[torch.float32] for e in errs.values()), errs


# 4 chunks; 38 chunks: both state passes at two levels (R = 32: a scan over two segments)
@pytest.mark.usefixtures("two_levels_at_any_length")
@pytest.mark.parametrize("S,dtype", [(53, torch.float32), (600, torch.float32), (600, torch.bfloat16)])
@pytest.mark.parametrize("index", range(max(len(configs) for configs in mk.TUNED.values())))
def test_mlstm_every_launch_config_matches_oracle(index, S, dtype):
    """Candidate ``index`` of every autotuned kernel (shorter lists wrap around), pinned: outputs and all
    gradients against the fp64 oracle; a ragged tail, grouped heads, initial state. DK=64, DV=128 keep
    every candidate's blocks unclipped."""
    B, NH, NKV, DK, DV, L = 1, 4, 2, 64, 128, 16
    q, _, _, i_pre, f_pre = mlstm_inputs(B, NH, S, DK, DV, dtype, seed=16)
    _, k, v, _, _ = mlstm_inputs(B, NKV, S, DK, DV, dtype, seed=17)
    g = torch.Generator(device="cuda").manual_seed(18)
    state = leaves([
        torch.rand(B, NH, DK, DV, device="cuda", generator=g),
        torch.rand(B, NH, DK, device="cuda", generator=g),
        torch.randn(B, NH, device="cuda", generator=g) + 2.0,
    ])
    xs = leaves([q, k, v, i_pre, f_pre])
    refs, state_ref = leaves(xs, torch.float64), leaves(state, torch.float64)
    assert all(len(mk._fit_blocks(c, {}, DK=DK, DV=DV)) == len(c) for c in mk.TUNED.values())
    with mk.pinned_launches(index, DK, DV) as configs:
        h, (C, n, m) = mlstm_chunkwise_triton(*xs, state=tuple(state), chunk_size=L)
        h.sum().backward(retain_graph=True)  # the reverse passes compile here: every kernel ran once
        for x in xs + state:
            x.grad = None
        with torch.no_grad():  # forward only: the output pass without the backward's stats, the same h
            assert torch.equal(mlstm_chunkwise_triton(*xs, state=tuple(state), chunk_size=L)[0], h.detach())
        rep = NH // NKV
        h_ref, final_ref = mlstm_chunkwise(
            refs[0], refs[1].repeat_interleave(rep, 1), refs[2].repeat_interleave(rep, 1), refs[3], refs[4],
            state=tuple(state_ref), chunk_size=L,
        )
        errs = errors_against_oracle(h, h_ref, xs + state, refs + state_ref, (C, n, m), final_ref)
    assert all(e < TOL[dtype] for e in errs.values()), (configs, errs)


@pytest.mark.autotune
def test_mlstm_tuning_key_buckets_batch_heads_and_chunk_count():
    """Same DK, DV, L, dtypes and power-of-two buckets of B·NH and of the chunk count: the tuned launch
    is reused; a length in the next bucket is tuned anew (from the disk cache if tuned before)."""

    def run(B, NH, S):
        mlstm_chunkwise_triton(*leaves(mlstm_inputs(B, NH, S, 32, 32, torch.float32)))[0].sum().backward()

    for kernel in mk.TUNED:
        kernel.cache.clear()
    run(1, 2, 100)  # B·NH 2, 2 chunks of 64
    assert [len(kernel.cache) for kernel in mk.TUNED] == [1] * 4
    run(1, 3, 150)  # B·NH 3, 3 chunks: the same buckets
    assert [len(kernel.cache) for kernel in mk.TUNED] == [1] * 4
    run(1, 2, 250)  # 4 chunks: the next bucket (one level, as every length below TWO_LEVEL_MIN_TOKENS)
    assert [len(kernel.cache) for kernel in mk.TUNED] == [2] * 4


def test_mlstm_rejects_unsupported_head_dim():
    q = torch.rand(1, 1, 16, 48, device="cuda")
    with pytest.raises(ValueError, match="DK=48"):
        mlstm_chunkwise_triton(q, q, torch.rand(1, 1, 16, 64, device="cuda"), q[..., 0], q[..., 0])


def swa_reference(q, k, v, window, sinks):
    S, D = q.shape[-2], q.shape[-1]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    t = torch.arange(S, device=q.device)
    visible = (t[None] <= t[:, None]) & ((t[:, None] - t[None] < window) | (t[None] < sinks))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~visible, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,S,D,window,sinks", [(6, 2, 300, 64, 64, 4), (4, 4, 257, 128, 100, 0), (9, 3, 200, 64, 512, 4)])
def test_swa_matches_dense_masked_softmax(dtype, H, Hkv, S, D, window, sinks):
    g = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(2, H, S, D, device="cuda", generator=g, dtype=dtype)
    k = torch.randn(2, Hkv, S, D, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(2, Hkv, S, D, device="cuda", generator=g, dtype=dtype)
    xs, refs = leaves([q, k, v]), leaves([q, k, v], torch.float64)
    o = swa_attention(*xs, window, sinks)
    o_ref = swa_reference(*refs, window, sinks)
    do = torch.randn_like(o_ref)
    (o.double() * do).sum().backward()
    (o_ref * do).sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    errs = {"o": rel_err(o, o_ref)} | {f"d{n}": rel_err(x.grad, r.grad) for n, x, r in zip("qkv", xs, refs)}
    assert all(e < tol for e in errs.values()), errs
