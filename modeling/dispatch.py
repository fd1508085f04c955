"""Routes the student's two branches to the GPU kernels on CUDA and to the PyTorch reference elsewhere.

* mLSTM chunkwise (training, prefill): ``xmerge.kernels.mlstm_chunkwise.mlstm_chunkwise_triton``
  when the tensors are on CUDA, triton imports and head dims and chunk size are powers of two >= 16.
  The kernel takes q, k, v in the model's dtype and returns h in it (``mlstm_dtype`` tells the
  caller which dtype to build them in, so nothing is copied to fp32 and back).
* SWA over new tokens that start the sequence (no cache yet or an empty one, no left padding):
  ``xmerge.kernels.swa_triton.swa_attention_triton`` where it takes the shapes (power-of-two head dims
  16..128, B·H within its grid), else ``xmerge.kernels.swa.swa_attention`` (FlexAttention). The
  Triton kernel measured 1.2-1.3× Flex's forward and 1.4-2.6× its fw+bw on an H200
  (benchmarks/RESULTS-kernels.md) and compiles once per head dim and window rather than once per
  sequence length. Decode steps, later prefill chunks and
  left-padded batches keep the reference, which reads the cache's ring and sink buffers.

Under ``torch.autocast`` the kernels run in the autocast dtype (the reference's matmuls do too);
otherwise in their inputs' dtype. CPU always runs the reference, unchanged.

Switch: ``XMERGE_KERNELS=0`` forces the reference everywhere (read at every call, so a test or a
benchmark can compare both paths in one process).

Compiled regions: the student's kernel-free stretches (projections and RoPE, feature maps and gates, the
hybrid mix, residuals and MLP) can run under ``torch.compile``, which fuses their elementwise operators.
``XMERGE_COMPILE`` (read at every call): ``auto`` (default) compiles inference calls on CUDA of at least
``COMPILE_MIN_TOKENS`` tokens, ``1`` every call (training too), ``0`` none. The threshold is the measured
crossover on an H200 (benchmarks/RESULTS-gpu.md, SmolLM2 prefill at B=1): compiled regions took 117 ms
against eager's 153 ms at 64K, since at that length the GPU works through each elementwise pass, but
89 against 70 ms at 4K and 86 against 76 at 16K, where the host's dispatch bounds the time and the
compiled regions' guards add to it. Never inside a CUDA-graph capture, which the graph decoder does
(a compile there would fail). The first compiled call compiles (tens of seconds, logged once).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from xmerge.modeling.cache import LayerCache
from xmerge.modeling.mlstm import MLSTMState, mlstm_chunkwise
from xmerge.modeling.swa import blocked_window_sink_attention, gather_sinks, window_sink_attention


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_enabled(x: torch.Tensor) -> bool:
    """Whether the kernels may run on ``x``'s device: CUDA, triton importable, not switched off."""
    return x.is_cuda and os.environ.get("XMERGE_KERNELS", "1") != "0" and _triton_available()


COMPILE_MIN_TOKENS = 32768
COMPILE_MODES = ("auto", "0", "1")
log = logging.getLogger(__name__)


def compile_wanted(x: torch.Tensor) -> bool:
    """Whether a compiled region runs compiled for an input ``x`` (B, T, ...) under ``XMERGE_COMPILE``."""
    mode = os.environ.get("XMERGE_COMPILE", "auto")
    if mode not in COMPILE_MODES:
        raise ValueError(f"XMERGE_COMPILE={mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode == "0" or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    if mode == "1":
        return True
    return (x.is_cuda and not torch.is_grad_enabled() and x.shape[:-1].numel() >= COMPILE_MIN_TOKENS
            and _triton_available())


def compiled_region(method):
    """``method`` under ``torch.compile(dynamic=True)`` where ``compile_wanted`` says so, eager otherwise.

    For methods ``(self, x, ...)`` whose first tensor ``x`` is (B, T, ...) and whose bodies hold no kernel
    call, cache write or host read. One compiled function serves every layer (modules are inputs to it,
    not constants) and every batch and length. If compiling fails under ``auto``, which nobody asked for
    by name, the region logs a warning and runs eagerly from then on (the body is pure, so rerunning it
    is safe); under ``XMERGE_COMPILE=1`` the error is raised.
    """
    compiled = None
    failed = False

    @functools.wraps(method)
    def run(module, x, *args, **kwargs):
        nonlocal compiled, failed
        if failed or not compile_wanted(x):
            return method(module, x, *args, **kwargs)
        if compiled is None:
            log.info("compiling %s for long inputs (once per process)", method.__qualname__)
            compiled = torch.compile(method, dynamic=True)
        try:
            return compiled(module, x, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:
            if os.environ.get("XMERGE_COMPILE", "auto") == "1":
                raise
            log.warning("compiling %s failed, it runs eagerly from now on (%s: %s)", method.__qualname__,
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            failed = True
            return method(module, x, *args, **kwargs)

    return run


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype


def _mlstm_kernel_takes(q: torch.Tensor, dv: int, chunk_size: int) -> bool:
    return (
        _pow2_at_least_16(q.shape[-1]) and _pow2_at_least_16(dv) and _pow2_at_least_16(chunk_size)
        and kernels_enabled(q)
    )


def mlstm_dtype(q: torch.Tensor, dv: int, chunk_size: int) -> torch.dtype:
    """The dtype ``mlstm_forward`` wants q, k, v in: the kernel's where it takes the call (it accumulates
    in fp32 itself), fp32 for the reference. q: (B, NH, S, DK) before the cast; dv: the value head dim."""
    return _kernel_dtype(q) if _mlstm_kernel_takes(q, dv, chunk_size) else torch.float32


def mlstm_forward(
    q, k, v, i_pre, f_pre, *, chunk_size: int, state: MLSTMState | None, eps: float
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM: h (B, NH, S, DV) in ``mlstm_dtype`` and the final state (fp32).

    q: (B, NH, S, DK) and k: (B, NKV, S, DK) feature-mapped, NH a multiple of NKV (query head h reads
    kv head h // (NH / NKV)); v: (B, NKV, S, DV); q, k, v best already in ``mlstm_dtype`` (then no
    copy is made); i_pre, f_pre: (B, NH, S), any float dtype (the kernel reads them in place, the
    reference in fp32), ĩ = -inf on padding; state: (C (B, NH, DK, DV), n (B, NH, DK), m (B, NH)) or None.
    """
    if not _mlstm_kernel_takes(q, v.shape[-1], chunk_size):
        rep = q.shape[1] // k.shape[1]
        return mlstm_chunkwise(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), i_pre.float(), f_pre.float(),
            chunk_size=chunk_size, state=state, eps=eps,
        )
    from xmerge.kernels.mlstm_chunkwise import mlstm_chunkwise_triton

    dtype = _kernel_dtype(q)
    with torch.autocast("cuda", enabled=False):
        return mlstm_chunkwise_triton(
            q.to(dtype), k.to(dtype), v.to(dtype), i_pre, f_pre, state=state, chunk_size=chunk_size, eps=eps
        )


def swa_forward(
    q, k, v, positions, start, *, window: int, sinks: int, fresh: bool, layer: LayerCache | None = None
) -> torch.Tensor:
    """Window + sink attention of the new tokens: (B, H, T, D).

    q: (B, H, T, D) and k, v: (B, Hkv, T, D) rotated, of the new tokens at ``positions`` (T,);
    start: (B,) each row's first real slot; fresh: the new tokens start every row's sequence (slot 0,
    no left padding), known on the host so that choosing the path reads nothing from the device;
    layer: the cache before these tokens (its sink buffer already holding the new tokens' sinks), or
    None without a cache (the sinks are then taken from the new tokens).
    """
    if fresh and kernels_enabled(q):
        from xmerge.kernels.swa_triton import swa_attention_triton, takes

        if takes(q):
            attend = swa_attention_triton
        else:
            from xmerge.kernels.swa import swa_attention as attend

        dtype = _kernel_dtype(q)
        with torch.autocast("cuda", enabled=False):
            return attend(q.to(dtype), k.to(dtype), v.to(dtype), window, sinks)
    if layer is None:
        sink_k, sink_v, sink_pos = gather_sinks(k, v, start, sinks, positions[0])
        return blocked_window_sink_attention(q, k, v, positions, sink_k, sink_v, sink_pos, start=start, window=window)
    return cached_window_attention(q, k, v, positions, layer, start=start, window=window)


def cached_window_attention(q, k, v, positions, layer, *, start, window: int) -> torch.Tensor:
    """Window+sink attention of new tokens (B, H, T, D) at ``positions`` (T,) over the layer cache's
    ring and sinks plus the new keys themselves (the cache is written afterwards by the caller)."""
    return window_sink_attention(
        q,
        torch.cat([layer.ring_k, k.to(layer.ring_k.dtype)], dim=2),
        torch.cat([layer.ring_v, v.to(layer.ring_v.dtype)], dim=2),
        torch.cat([layer.ring_pos, positions]),
        layer.sink_k,
        layer.sink_v,
        layer.sink_pos,
        q_pos=positions,
        start=start,
        window=window,
    )
