"""A random-weight teacher of SmolLM2-135M's shape, as an HF directory (config, safetensors, tokenizer).

Decode and prefill times do not depend on the weights' values, so A/B timings of the student's kernels
(``benchmarks/gpu_student.py --teacher DIR``) can run on it where the real teacher file is not at hand
(on the GPU machine it takes two device calls to bring). Quality and the kernel-vs-reference error on real
weights still need the real teacher. The tokenizer is a one-token stand-in (the benchmarks feed random ids).

    python3 benchmarks/random_teacher.py /tmp/rand
"""

from __future__ import annotations

import argparse

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# SmolLM2-135M(-Instruct): Llama, 30 layers, 9 query / 3 kv heads of 64, tied embeddings
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True,
)


def write_random_teacher(out: str, layers: int | None = None, seed: int = 0) -> None:
    """Write the random bf16 teacher to ``out``; ``layers`` overrides the layer count (smaller runs)."""
    config = LlamaConfig(**{**SMOLLM2_135M, **({} if layers is None else {"num_hidden_layers": layers})})
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    stand_in = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=stand_in, unk_token="<unk>").save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="directory to write")
    parser.add_argument("--layers", type=int, default=None, help="layer count (default: SmolLM2-135M's 30)")
    args = parser.parse_args()
    write_random_teacher(args.out, args.layers)


if __name__ == "__main__":
    main()
