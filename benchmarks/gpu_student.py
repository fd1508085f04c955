"""Inference of the SmolLM2 student vs its teacher on one GPU (issue 7, model level).

Same run, real SmolLM2-135M-Instruct weights, both models bf16 under bf16 autocast, random tokens:
* prefill at B=1: time to first token (forward with cache over the prompt, logits of the last
  position only, argmax) and prefill tokens/s = prompt / that time;
* greedy decode with a cache: tokens/s = B × steps / time of the steps alone (prefill excluded);
* GPU memory allocated after the prompt and after each checkpoint of generated tokens.
Teacher: HF LlamaForCausalLM, SDPA, its default DynamicCache, eager; for the configurations in
--teacher-compiled also its best path: a StaticCache and the forward under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs). Student: kernel path (modeling/dispatch) for
prefill, its HybridCache; decode eager (Python per layer) and as one CUDA-graph replay per token
(modeling/decode_graph), with the fused decode kernel and, for comparison, with the pure-PyTorch step.
Ratios are teacher time / student time. B=1 rows also give the fraction of the HBM bound
(weights bytes / bandwidth, --hbm-tb-s). Prefill times the student as it ships ("student": compiled
regions from 32K tokens, XMERGE_COMPILE=auto), always eager ("student_eager", XMERGE_COMPILE=0) and
always compiled ("student_compiled", XMERGE_COMPILE=1); a compile falls in the untimed first call.

    python3 benchmarks/gpu_student.py --teacher /tmp/xm/SmolLM2-135M-Instruct.Q4_1.gguf --out student.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch._dynamo

from transformers import StaticCache

from xmerge.modeling import decode_graph
from xmerge.modeling.convert import convert_teacher
from xmerge.modeling.decode_graph import GraphedGreedyDecoder
from xmerge.modeling.teacher import load_teacher

GIB = 2**30
# prefill rows: name -> (model, XMERGE_COMPILE)
PREFILL_VARIANTS = {
    "teacher": ("teacher", "0"),
    "student": ("student", "auto"),
    "student_eager": ("student", "0"),
    "student_compiled": ("student", "1"),
}

# decode runs: name -> (model, mode of ``decode``)
DECODE_RUNS = {
    "teacher": ("teacher", "eager"),
    "student": ("student", "eager"),
    "student_graph_unfused": ("student", "graph_unfused"),
    "student_graph": ("student", "graph"),
}


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_token(model, ids):
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values


def decode(model, batch: int, prompt: int, steps: int, checkpoints: tuple[int, ...], vocab: int,
           mode: str = "eager", compiled=None) -> dict:
    """Greedy decode after a random prompt: tokens/s of the steps and memory at each checkpoint.

    mode: "eager" (the model's forward per token), "graph" / "graph_unfused" (the student's CUDA-graph
    decoder with / without the fused kernel step) or "static" (the teacher's StaticCache and
    ``compiled``, its compiled forward; the first steps, which compile, run before the clock).
    """
    torch.cuda.empty_cache()
    ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
    if mode == "static":
        cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        slot = torch.tensor([prompt], device="cuda")

        def advance(n: int) -> None:
            nonlocal tok, slot
            for _ in range(n):
                logits = compiled(input_ids=tok, position_ids=slot[None].expand(batch, 1), cache_position=slot,
                                  past_key_values=cache, use_cache=True).logits
                tok, slot = logits[:, -1].argmax(-1, keepdim=True), slot + 1

        advance(3)  # compiles (once per shape) and records the CUDA graphs
    else:
        tok, cache = first_token(model, ids)
    del ids
    if mode.startswith("graph"):
        decoder = GraphedGreedyDecoder(model, cache, tok, fused=mode == "graph")
        decoder.generate(2)  # hand out the eager warmup tokens before the clock starts
        advance = decoder.generate
    elif mode == "eager":

        def advance(n: int) -> None:
            nonlocal tok, cache
            for _ in range(n):
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                tok, cache = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    torch.cuda.synchronize()
    memory = {0: torch.cuda.memory_allocated() / GIB}
    torch.cuda.reset_peak_memory_stats()
    done = 0
    t0 = time.perf_counter()
    for mark in sorted({*checkpoints, steps}):
        advance(mark - done)
        done = mark
        torch.cuda.synchronize()
        memory[mark] = torch.cuda.memory_allocated() / GIB
    elapsed = time.perf_counter() - t0
    return {
        "tokens_per_s": batch * steps / elapsed,
        "ms_per_step": 1e3 * elapsed / steps,
        "allocated_gib": memory,
        "decode_peak_gib": torch.cuda.max_memory_allocated() / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher spec: alias, HF dir or .gguf file")
    parser.add_argument("--prefill", default="4096,16384,65536,131072", help="prompt lengths at B=1")
    parser.add_argument("--decode", default="1x4096,8x4096,32x4096,1x32768,8x32768,32x32768", help="BxPROMPT list")
    parser.add_argument("--teacher-compiled", default="1x4096,8x32768",
                        help="BxPROMPT decode configurations that also time the teacher's static-cache compiled path")
    parser.add_argument("--decode-runs", default=",".join(DECODE_RUNS),
                        help=f"decode runs to time, of {','.join(DECODE_RUNS)} (teacher_static_compiled: --teacher-compiled)")
    parser.add_argument("--hbm-tb-s", type=float, default=3.35, help="HBM bandwidth for the B=1 bound (H100 SXM: 3.35)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per configuration")
    parser.add_argument("--memory-steps", type=int, default=512, help="decode steps of the memory run (8x4096)")
    parser.add_argument("--budget-s", type=float, default=400, help="skip what would start after this many seconds")
    parser.add_argument("--profile", default="", help="prompt lengths whose student prefill to profile (top CUDA ops)")
    parser.add_argument("--profile-decode", default="", help="BxPROMPT list whose fused graph decode to profile")
    parser.add_argument("--no-pdl", action="store_true",
                        help="decode kernels as plain launches, each waiting for the one before: a profile's kernel "
                             "times then add up to the step (with programmatic dependent launches they overlap)")
    parser.add_argument("--row-products-max-b", type=int, default=None,
                        help="widest batch whose decode products are few-row Triton launches (default: "
                             "modeling/decode_graph.ROW_PRODUCTS_MAX_B; 0: cuBLAS at every B)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.no_pdl:
        from xmerge.kernels import decode_rowwise

        decode_rowwise.pdl_capable = lambda t: False  # read on every launch
    if args.row_products_max_b is not None:
        decode_graph.ROW_PRODUCTS_MAX_B = args.row_products_max_b
    decode_runs = args.decode_runs.split(",")
    if not set(decode_runs) <= set(DECODE_RUNS):
        parser.error(f"--decode-runs: {args.decode_runs!r} names runs outside {','.join(DECODE_RUNS)}")
    # compiled code (the teacher's static path; Flex, for head dims the Triton SWA does not take) may
    # specialise per shape: every benchmarked shape must keep its compiled entry
    torch._dynamo.config.recompile_limit = 64
    clock = time.perf_counter()

    teacher, _ = load_teacher(args.teacher)
    student = convert_teacher(teacher).to(torch.bfloat16).cuda().eval()
    teacher = teacher.to(torch.bfloat16).cuda().eval()
    models = {"teacher": teacher, "student": student}
    vocab = teacher.config.vocab_size
    teacher_compiled = torch.compile(teacher.forward, mode="reduce-overhead", fullgraph=True)
    weights_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    hbm_bound = args.hbm_tb_s * 1e12 / weights_bytes  # tokens/s at B=1 if each step only read the weights once
    result = {
        "student_weights_bytes": weights_bytes,
        "hbm_bound_tokens_per_s_b1": hbm_bound,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "teacher_attn": teacher.config._attn_implementation,
        "prefill": [],
        "decode": [],
    }

    def save() -> None:  # after every row, so a run cut short still leaves its rows
        result["wall_s"] = time.perf_counter() - clock
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    def over_budget(what: str) -> bool:
        if time.perf_counter() - clock > args.budget_s:
            print(f"skipped (time budget): {what}", flush=True)
            result.setdefault("skipped", []).append(what)
            return True
        return False

    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        # the kernel path on real weights against the reference path, same bf16 setup
        ids = torch.randint(0, vocab, (1, 4096), device="cuda")
        os.environ["XMERGE_KERNELS"] = "0"
        ref = student(input_ids=ids).logits.float()
        os.environ["XMERGE_KERNELS"] = "1"
        ours = student(input_ids=ids).logits.float()
        result["kernel_vs_reference_logits_rel_err_4k"] = ((ours - ref).norm() / ref.norm()).item()
        result["kernel_vs_reference_top1_agreement_4k"] = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print("kernel vs reference (4K, bf16):", result["kernel_vs_reference_logits_rel_err_4k"], flush=True)
        del ref, ours

        for length in map(int, filter(None, args.prefill.split(","))):
            if over_budget(f"prefill {length}"):
                break
            ids = torch.randint(0, vocab, (1, length), device="cuda")
            row = {"prompt": length}
            for name, (model, compiled) in PREFILL_VARIANTS.items():
                os.environ["XMERGE_COMPILE"] = compiled
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    seconds = timed(lambda: first_token(models[model], ids), repeats=3)
                    row[name] = {"ttft_ms": 1e3 * seconds, "tokens_per_s": length / seconds,
                                 "peak_gib": torch.cuda.max_memory_allocated() / GIB}
                except Exception as error:  # noqa: BLE001 - record OOM or a failed compile, keep measuring
                    row[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
                if name != "teacher" and "ttft_ms" in row["teacher"] and "ttft_ms" in row[name]:
                    row[f"speedup_{name}"] = row["teacher"]["ttft_ms"] / row[name]["ttft_ms"]
            os.environ["XMERGE_COMPILE"] = "auto"  # as the student ships, for the profile and decode rows
            result["prefill"].append(row)
            save()
            print("prefill", json.dumps(row), flush=True)

        for length in filter(None, args.profile.split(",")):
            ids = torch.randint(0, vocab, (1, int(length)), device="cuda")
            first_token(student, ids)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                first_token(student, ids)
                torch.cuda.synchronize()
            print(f"student prefill profile at {length}:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))

        for config in filter(None, args.profile_decode.split(",")):
            batch, prompt = map(int, config.split("x"))
            tok, cache = first_token(student, torch.randint(0, vocab, (batch, prompt), device="cuda"))
            decoder = GraphedGreedyDecoder(student, cache, tok, fused=True)
            decoder.generate(4)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                decoder.generate(16)
                torch.cuda.synchronize()
            print(f"fused graph decode profile at {config} (16 steps; kernels inside the graph replays):")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
            del decoder, cache

        memory_config = (8, 4096)
        for config in filter(None, args.decode.split(",")):
            batch, prompt = map(int, config.split("x"))
            if over_budget(f"decode {config}"):
                break
            is_memory_run = (batch, prompt) == memory_config
            steps = args.memory_steps if is_memory_run else args.steps
            checkpoints = tuple(s for s in (128, 256, 512, 1024, 2048) if s <= steps) if is_memory_run else ()
            row = {"batch": batch, "prompt": prompt, "steps": steps}
            runs = {name: (models[model], mode) for name, (model, mode) in DECODE_RUNS.items() if name in decode_runs}
            if config in args.teacher_compiled.split(","):
                runs["teacher_static_compiled"] = (teacher, "static")
            for name, (model, mode) in runs.items():
                try:
                    row[name] = decode(model, batch, prompt, steps, checkpoints, vocab, mode, teacher_compiled)
                except Exception as error:  # noqa: BLE001 - record OOM or a failed capture, keep measuring
                    row[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
            for key in runs:
                if key.startswith("student") and "tokens_per_s" in row[key]:
                    for base in ("teacher", "teacher_static_compiled"):
                        if "tokens_per_s" in row.get(base, {}):
                            row[f"{key}_vs_{base}"] = row[key]["tokens_per_s"] / row[base]["tokens_per_s"]
                    if batch == 1:
                        row[key]["fraction_of_hbm_bound"] = row[key]["tokens_per_s"] / hbm_bound
            result["decode"].append(row)
            save()
            print("decode", json.dumps(row), flush=True)
    save()


if __name__ == "__main__":
    main()
