"""Teacher top-k target build throughput vs the teacher's bare forward, same run.

    python -m xmerge.benchmarks.targets_build [--device cuda --batch 8 --seq 2048 --blocks 64 --k 256]

The teacher is a random Llama with SmolLM2-135M's shape (throughput does not depend on the
weights, so no file has to travel). Baseline: the teacher's forward over the same blocks,
logits computed and dropped. Measured: `build_targets` into a fresh cache (fp32 log-softmax,
top-k, device->host copy, safetensors shards), then a cached call and a full read-back.
Prints a markdown table; timings are the best of `repeats`, each after one warm-up.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from xmerge.experts.targets import build_targets

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, tie_word_embeddings=True)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device, dtype).eval()
    blocks = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.blocks, args.seq),
                           generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def forward_only():
        for start in range(0, args.blocks, args.batch):
            teacher(input_ids=blocks[start:start + args.batch].to(device), use_cache=False).logits.float()

    def build(cache_dir: Path):
        return build_targets(teacher, blocks, k=args.k, teacher_hash="bench", data_fingerprint="bench",
                             split="train", cache_dir=cache_dir, batch_size=args.batch, progress=False)

    forward_only()  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp) / "warmup")
        fwd = min(timed(forward_only, device) for _ in range(args.repeats))
        fresh = min(timed(lambda r=r: build(Path(tmp) / f"run{r}"), device) for r in range(args.repeats))
        cached = min(timed(lambda: build(Path(tmp) / "run0"), device) for _ in range(args.repeats))
        targets = build(Path(tmp) / "run0")
        read = min(timed(lambda: targets.load(0, len(targets)), device) for _ in range(args.repeats))
        shard_bytes = sum(f.stat().st_size for f in targets.directory.glob("*.safetensors"))

    tokens = args.blocks * args.seq
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, {dtype}, {args.blocks}x{args.seq} tokens, batch {args.batch}, k={args.k}, "
          f"shards {shard_bytes / 2**20:.0f} MiB ({shard_bytes / tokens:.0f} B/token)\n")
    print("| step | seconds | ktok/s | vs teacher forward |")
    print("|---|---|---|---|")
    for label, seconds in [("teacher forward only (baseline)", fwd), ("build_targets, fresh cache", fresh),
                           ("build_targets, cached (no teacher run)", cached), ("load all cached targets", read)]:
        print(f"| {label} | {seconds:.3f} | {tokens / seconds / 1e3:,.0f} | {fwd / seconds:.2f}x |")


if __name__ == "__main__":
    main()
