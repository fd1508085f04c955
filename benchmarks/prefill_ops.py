"""Host cost of one prefill: operators per decoder layer and host time, student (kernel path) vs teacher (HF).

On a GPU every eager PyTorch operator costs host time (dispatch, and a launch for the ones that compute),
so a prefill whose GPU work is small is bound by this count. The count is the same on any device, so
this runs on CPU: the student is routed to its CUDA path (``modeling/dispatch``) with the two kernels
replaced by stand-ins of one operator each (a Triton launch or a compiled FlexAttention call is not an
aten operator: each adds its own launch cost on top of the count). Views are counted apart: they
dispatch but launch nothing. Host time: a 30-layer model of tiny width, so that the arithmetic is
negligible, per prefill of 64 tokens on one CPU thread: teacher, student eager, and the student with
its compiled regions (XMERGE_COMPILE=1). On CPU no launch is saved: this times dispatch against the
compiled code's own per-call overhead.

    python -m xmerge.benchmarks.prefill_ops [--tokens 256]
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

from xmerge.modeling import dispatch
from xmerge.modeling.convert import convert_teacher

VIEWS = {"view", "_unsafe_view", "unsqueeze", "transpose", "t", "slice", "expand", "reshape", "select",
         "permute", "squeeze", "alias", "as_strided", "detach"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def kernel_stand_ins() -> None:
    """The student's CUDA path on CPU: each kernel one empty output in its contract's shape and dtype."""
    dispatch.kernels_enabled = lambda x: True
    mlstm = types.ModuleType("xmerge.kernels.mlstm_chunkwise")

    def mlstm_chunkwise_triton(q, k, v, i_pre, f_pre, state=None, chunk_size=64, eps=1e-6):
        B, NH, _, DK = q.shape
        final = (q.new_zeros(B, NH, DK, v.shape[-1]), q.new_zeros(B, NH, DK), q.new_zeros(B, NH))
        return torch.empty(*q.shape[:3], v.shape[-1], dtype=v.dtype), final

    mlstm.mlstm_chunkwise_triton = mlstm_chunkwise_triton
    swa = types.ModuleType("xmerge.kernels.swa")
    swa.swa_attention = lambda q, k, v, window, sinks: torch.empty_like(q)
    sys.modules.update({mlstm.__name__: mlstm, swa.__name__: swa})


def ops_per_layer(build, tokens: int, final_state_ops: int = 0) -> tuple[float, float]:
    """(operators, views) per decoder layer of ``build(layers)``'s fresh prefill with a cache, from the
    difference between 2 and 4 layers (so embedding, final norm and head cancel out)."""
    counts = {}
    for layers in (2, 4):
        model = build(layers)
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)  # first call: lazy set-up out of the count
            with OpCounter() as counter:
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
        counts[layers] = counter.counts
    diff = {op: (counts[4][op] - counts[2][op]) / 2 for op in counts[4]}
    views = sum(n for op, n in diff.items() if op in VIEWS)
    # the stand-in's own allocations are no operators of the real path
    return sum(diff.values()) - views - final_state_ops, views


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

    teacher_ops, teacher_views = ops_per_layer(teacher, args.tokens)
    kernel_stand_ins()
    student_ops, student_views = ops_per_layer(
        lambda layers: convert_teacher(teacher(layers), window=64, chunk_size=64).eval(), args.tokens,
        final_state_ops=3 + 1 + 1,  # the mLSTM stand-in's 3 zeros + 1 empty, the SWA stand-in's empty
    )
    print("| model | operators per layer | views per layer | + kernel launches per layer |")
    print("|---|---|---|---|")
    print(f"| teacher (HF Llama, SDPA) | {teacher_ops:.0f} | {teacher_views:.0f} | SDPA inside the count |")
    print(f"| student (kernel path) | {student_ops:.0f} | {student_views:.0f} | 3 Triton (mLSTM) + 1 FlexAttention |")
    print(f"| ratio student / teacher | {student_ops / teacher_ops:.2f}× | {student_views / max(teacher_views, 1):.2f}× | |")

    torch.set_num_threads(1)
    deep_teacher = teacher(30)
    deep_student = convert_teacher(deep_teacher, window=64, chunk_size=64).eval()
    ids = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    times = {"teacher (HF Llama, SDPA)": host_ms(deep_teacher, ids)}
    for compiled in ("0", "1"):
        os.environ["XMERGE_COMPILE"] = compiled
        times[f"student, XMERGE_COMPILE={compiled}"] = host_ms(deep_student, ids)
    base = times["teacher (HF Llama, SDPA)"]
    print("\n| 30 layers, 64 tokens, CPU | host ms per prefill | vs teacher |")
    print("|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}× |")


if __name__ == "__main__":
    main()
