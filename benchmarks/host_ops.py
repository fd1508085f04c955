"""Host cost of the student vs the teacher (HF): operators per decoder layer, and host time.

On a GPU every eager PyTorch operator costs host time (dispatch, and a launch for the ones that compute),
so a prefill or a training step whose GPU work is small is bound by this count. The count is the same on
any device, so this runs on CPU: the student is routed to its CUDA path (``modeling/dispatch``) with the
two kernels replaced by uncounted stand-ins (a Triton launch is not an
aten operator: each adds its own launch cost on top of the count). Counted: a fresh prefill with a cache
(the time to first token) and a training step (forward and backward of a loss on the logits). Views are
counted apart: they dispatch but launch nothing. Host time: a 30-layer model of tiny width, so that the
arithmetic is negligible, per prefill of 64 tokens on one CPU thread: teacher, student eager, and the
student with its compiled regions (XMERGE_COMPILE=1). On CPU no launch is saved: this times dispatch
against the compiled code's own per-call overhead.

    python -m xmerge.benchmarks.host_ops [--tokens 256]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from xmerge.benchmarks.tables import print_ratio_table
from xmerge.modeling import dispatch
from xmerge.modeling.convert import convert_teacher

VIEWS = {"view", "_unsafe_view", "unsqueeze", "transpose", "t", "slice", "expand", "reshape", "select",
         "permute", "squeeze", "alias", "as_strided", "detach"}


class OpCounter(TorchDispatchMode):
    """Operators dispatched inside the block, by name; none while ``paused`` (the kernels' stand-ins)."""

    paused = False

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not OpCounter.paused:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _Kernel(torch.autograd.Function):
    """A kernel's stand-in: an output of ``shape`` and ``dtype`` and a gradient for every input, none of
    it counted."""

    @staticmethod
    def forward(ctx, shape, dtype, *inputs):
        OpCounter.paused = True
        ctx.inputs = [(x.shape, x.dtype) for x in inputs]
        out = torch.zeros(shape, dtype=dtype)
        OpCounter.paused = False
        return out

    @staticmethod
    def backward(ctx, grad):
        OpCounter.paused = True
        grads = [torch.zeros(shape, dtype=dtype) for shape, dtype in ctx.inputs]
        OpCounter.paused = False
        return None, None, *grads


def kernel_stand_ins() -> None:
    """The student's CUDA path on CPU, its two kernels replaced by uncounted stand-ins."""
    dispatch.kernels_enabled = lambda x: True
    mlstm = types.ModuleType("xmerge.kernels.mlstm_chunkwise")

    def mlstm_chunkwise_triton(q, k, v, i_pre, f_pre, state=None, chunk_size=64, eps=1e-6):
        B, NH, S, DK = q.shape
        h = _Kernel.apply((B, NH, S, v.shape[-1]), v.dtype, q, k, v, i_pre, f_pre)
        OpCounter.paused = True
        final = (q.new_zeros(B, NH, DK, v.shape[-1]), q.new_zeros(B, NH, DK), q.new_zeros(B, NH))
        OpCounter.paused = False
        return h, final

    mlstm.mlstm_chunkwise_triton = mlstm_chunkwise_triton
    swa, swa_triton = types.ModuleType("xmerge.kernels.swa"), types.ModuleType("xmerge.kernels.swa_triton")
    swa.swa_attention = swa_triton.swa_attention_triton = (
        lambda q, k, v, window, sinks: _Kernel.apply(q.shape, q.dtype, q, k, v))
    swa_triton.takes = lambda q: True
    sys.modules.update({module.__name__: module for module in (mlstm, swa, swa_triton)})


def prefill(model, ids) -> None:
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)


def training_step(model, ids) -> None:
    model.zero_grad(set_to_none=True)  # as the trainer does: gradients are set, not accumulated
    model(input_ids=ids).logits.logsumexp(-1).mean().backward()


def ops_per_layer(build, run, tokens: int) -> tuple[float, float]:
    """(operators, views) per decoder layer of ``run(build(layers), ids)``, from the difference between
    2 and 4 layers (so embedding, final norm, head and loss cancel out)."""
    counts = {}
    for layers in (2, 4):
        model = build(layers)
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        run(model, ids)  # first call: lazy set-up out of the count
        with OpCounter() as counter:
            run(model, ids)
        counts[layers] = counter.counts
    diff = {op: (counts[4][op] - counts[2][op]) / 2 for op in counts[4]}
    views = sum(n for op, n in diff.items() if op in VIEWS)
    return sum(diff.values()) - views, views


def host_ms(model, ids, repeats: int = 20) -> float:
    """Median wall ms of a cached prefill, after warm-up calls (which also compile)."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            if i >= 3:
                times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


RUNS = {"prefill": prefill, "training step": training_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="prompt length (the count does not depend on it)")
    args = parser.parse_args()
    # SmolLM2-135M's layer shape at a tenth of its width: the count depends on the structure, not the size
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)

    def teacher(layers: int) -> LlamaForCausalLM:
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()

    student = lambda layers: convert_teacher(teacher(layers), window=64, chunk_size=64).eval()  # noqa: E731
    counts = {(name, "teacher"): ops_per_layer(teacher, run, args.tokens) for name, run in RUNS.items()}
    kernel_stand_ins()
    counts |= {(name, "student"): ops_per_layer(student, run, args.tokens) for name, run in RUNS.items()}
    print("| per decoder layer | teacher (HF Llama, SDPA) | student (kernel path) | student / teacher |")
    print("|---|---|---|---|")
    for name in RUNS:
        (t_ops, t_views), (s_ops, s_views) = counts[name, "teacher"], counts[name, "student"]
        print(f"| {name}: operators | {t_ops:.0f} | {s_ops:.0f} | {s_ops / t_ops:.2f}× |")
        print(f"| {name}: views | {t_views:.0f} | {s_views:.0f} | {s_views / t_views:.2f}× |")
    print("| Triton launches (not aten operators) | SDPA, counted above | mLSTM 3 (5 at two levels) + SWA 1 forward, "
          "mLSTM 3 (6) + SWA 3-4 backward | |")

    torch.set_num_threads(1)
    deep_teacher, deep_student = teacher(30), student(30)
    ids = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    times = {"teacher (HF Llama, SDPA)": host_ms(deep_teacher, ids)}
    for compiled in ("0", "1"):
        os.environ["XMERGE_COMPILE"] = compiled
        times[f"student, XMERGE_COMPILE={compiled}"] = host_ms(deep_student, ids)
    print()
    print_ratio_table(times, "teacher (HF Llama, SDPA)", row="30 layers, 64 tokens, CPU",
                      value="host ms per prefill")


if __name__ == "__main__":
    main()
