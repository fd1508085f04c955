"""Triton sliding-window + sink attention (kernels/swa_triton.py) on the GPU; skipped without CUDA.

Outputs and dq, dk, dv against the fp64 dense-mask oracle (modeling/swa.py) fed the same
(dtype-rounded) inputs, relative in the Frobenius norm, with the tolerances of test_kernels.py;
outputs also against FlexAttention (kernels/swa.py). Ragged lengths, windows below and above the
blocks and past S (plain causal), sinks spanning several blocks, grouped and plain heads.
"""

from __future__ import annotations

import pytest
import torch

from xmerge.modeling.swa import swa_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
pytest.importorskip("triton")

from xmerge.kernels import swa_triton as st  # noqa: E402
from xmerge.kernels.swa import swa_attention  # noqa: E402
from xmerge.kernels.swa_triton import swa_attention_triton  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}

# H, Hkv, S, D, window, sinks
CASES = [
    (9, 3, 200, 64, 16, 4),  # window below every block size
    (4, 4, 300, 128, 100, 0),  # window above the blocks
    (9, 3, 1000, 64, 200, 4),
    (4, 4, 1000, 128, 30, 4),  # sinks far outside the window
    (9, 3, 300, 64, 512, 4),  # window >= S: plain causal
    (4, 4, 200, 128, 1000, 0),
    (4, 4, 1000, 32, 130, 70),  # sinks over two sink blocks, one of them inside the window
]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def inputs(B, H, Hkv, S, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, h, S, D, device="cuda", generator=g).to(dtype).requires_grad_() for h in (H, Hkv, Hkv)]


def errors(xs, window, sinks) -> dict[str, float]:
    """Relative errors of the output and dq, dk, dv against the fp64 oracle."""
    refs = [x.detach().double().requires_grad_() for x in xs]
    o = swa_attention_triton(*xs, window, sinks)
    o_ref = swa_reference(*refs, window=window, sinks=sinks)
    assert o.dtype == xs[0].dtype and o.shape == o_ref.shape
    do = torch.randn_like(o_ref)
    (o.double() * do).sum().backward()
    (o_ref * do).sum().backward()
    return {"o": rel_err(o, o_ref)} | {f"d{n}": rel_err(x.grad, r.grad) for n, x, r in zip("qkv", xs, refs)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,S,D,window,sinks", CASES)
def test_swa_triton_matches_oracle_outputs_and_gradients(dtype, H, Hkv, S, D, window, sinks):
    errs = errors(inputs(2, H, Hkv, S, D, dtype), window, sinks)
    assert all(e < TOL[dtype] for e in errs.values()), errs


@pytest.mark.parametrize("index", range(max(len(configs) for configs in st.TUNED.values())))
def test_swa_triton_every_launch_config_matches_oracle(index):
    """Candidate ``index`` of every autotuned kernel (shorter lists wrap around), pinned, at fp32:
    ragged tail, grouped heads, a window between the block sizes, sinks."""
    with st.pinned_launches(index):
        errs = errors(inputs(1, 6, 2, 333, 64, torch.float32, seed=index), 100, 4)
    assert all(e < TOL[torch.float32] for e in errs.values()), errs


@pytest.mark.autotune
@pytest.mark.parametrize("dtype,D", [(torch.float32, 64), (torch.bfloat16, 128)])
def test_swa_triton_autotuned_matches_oracle(dtype, D):
    """The launch that tuning picks (every candidate compiled and timed) is correct. fp32 at D=64: its
    ten compiles take ~2 min on one CPU core, at D=128 ~7 min, more than a device call had to spare."""
    errs = errors(inputs(1, 4, 2, 300, D, dtype, seed=3), 64, 4)
    assert all(e < TOL[dtype] for e in errs.values()), errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,S,D,window,sinks", [CASES[0], CASES[2], CASES[3]])
def test_swa_triton_matches_flex(dtype, H, Hkv, S, D, window, sinks):
    xs = [x.detach() for x in inputs(2, H, Hkv, S, D, dtype, seed=1)]
    assert rel_err(swa_attention_triton(*xs, window, sinks), swa_attention(*xs, window, sinks)) < TOL[dtype]


def test_swa_triton_takes_strided_inputs():
    """(B, S, H, D) storage viewed as (B, H, S, D): the same output and gradients as contiguous inputs."""
    g = torch.Generator(device="cuda").manual_seed(2)
    base = [torch.randn(1, 150, h, 64, device="cuda", generator=g) for h in (4, 2, 2)]
    strided = [x.transpose(1, 2).requires_grad_() for x in base]
    dense = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in base]
    for xs in (strided, dense):
        swa_attention_triton(*xs, 40, 2).square().sum().backward()
    assert torch.equal(swa_attention_triton(*strided, 40, 2), swa_attention_triton(*dense, 40, 2))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(strided, dense))


def test_swa_triton_rejects_bad_inputs():
    q = torch.randn(1, 4, 16, 64, device="cuda")
    k = torch.randn(1, 2, 16, 64, device="cuda")
    for bad_k, bad_v in [
        (q[:, :3], q[:, :3]),  # H not a multiple of Hkv
        (k[:, :, :8], k[:, :, :8]),  # S differs
        (k[..., :32], k[..., :32]),  # D differs
        (k, k[:, :1]),  # k and v differ
        (torch.randn(2, 2, 16, 64, device="cuda"),) * 2,  # B differs
    ]:
        with pytest.raises(ValueError, match="shapes disagree"):
            swa_attention_triton(q, bad_k, bad_v, 8, 4)
    with pytest.raises(ValueError, match="window must be"):
        swa_attention_triton(q, k, k, 0, 4)
    with pytest.raises(ValueError, match="window must be"):
        swa_attention_triton(q, k, k, 8, -1)
    q48 = torch.randn(1, 4, 16, 48, device="cuda")
    with pytest.raises(ValueError, match="D=48"):
        swa_attention_triton(q48, q48, q48, 8, 4)
    with pytest.raises(ValueError, match="must share"):
        swa_attention_triton(q, k.bfloat16(), k, 8, 4)
    wide = torch.randn(1, st.MAX_ROWS + 1, 2, 16, device="cuda")  # more rows than the grid holds
    assert st.takes(q) and not st.takes(wide) and not st.takes(q48)
    with pytest.raises(ValueError, match=f"B·H={st.MAX_ROWS + 1}"):
        swa_attention_triton(wide, wide, wide, 8, 4)
