"""Tiny real models and tokenizers built in a few lines, shared by every test module."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + 3 specials) with a chat template; no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for s in SPECIAL_TOKENS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


TINY_VOCAB = 256 + len(SPECIAL_TOKENS)
_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=256,
    pad_token_id=256,
    eos_token_id=258,
)


def tiny_teacher(family: str = "llama", seed: int = 0):
    """A random tiny teacher of one supported family, fp32, eval mode."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON))
    elif family == "olmo2":
        model = Olmo2ForCausalLM(Olmo2Config(**_COMMON))
    else:
        raise ValueError(family)
    # random init leaves biases / norms at trivial values; perturb them so tests see them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_student(family: str = "llama", seed: int = 0, **student_kwargs):
    """The tiny teacher converted to a student (conversion seed fixed)."""
    from xmerge.modeling.convert import convert_teacher

    return convert_teacher(tiny_teacher(family, seed), **student_kwargs).eval()


def tiny_registry(root, *, seed_name: str = "tiny", family: str = "llama"):
    """A registry under ``root`` holding seed ``seed_name``, converted from a tiny teacher saved in ``root``."""
    from xmerge.experts.seed import create_seed
    from xmerge.registry import Registry

    teacher_dir = root / "teacher"
    tiny_teacher(family).save_pretrained(teacher_dir)
    tiny_tokenizer().save_pretrained(teacher_dir)
    registry = Registry(root / "home")
    registry.init()
    create_seed(registry, seed_name, str(teacher_dir), window=8, sinks=2)
    return registry


def add_noised_expert(reg, domain: str, noise: float, seed: int, *, seed_name: str = "tiny", nan: bool = False):
    """Register the seed's weights plus Gaussian noise (std ``noise``) as an expert of ``domain``."""
    from safetensors.torch import load_file, save_file

    base = reg.resolve(f"seed:{seed_name}")
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: t + noise * torch.randn(t.shape, generator=generator)
               for name, t in load_file(reg.blob_path(base.weights_sha)).items()}
    if nan:
        next(iter(tensors.values())).view(-1)[0] = float("nan")
    path = reg.home / f"expert-{domain}-{seed}.safetensors"
    save_file(tensors, path)
    return reg.add_expert(seed_name, domain, path)


def gpu(test):
    """Mark a test as needing the device machine: CI (no CUDA) skips it, never counts it as passed."""
    for mark in (pytest.mark.gpu,
                 pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
                 pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")):
        test = mark(test)
    return test
