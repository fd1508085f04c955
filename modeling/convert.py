"""Teacher -> student conversion: copy every teacher weight, initialise the new ones from a seed.

Two conversions of one teacher with one seed are bit-identical; that is what makes experts
trained from the seed mergeable.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from xmerge.errors import XmergeError
from xmerge.modeling.config import SUPPORTED_FAMILIES, XLSTMStudentConfig
from xmerge.modeling.student import XLSTMStudentForCausalLM, is_new_parameter


def student_config_from_teacher(teacher_config, **student_fields) -> XLSTMStudentConfig:
    """Teacher-shaped fields from the teacher's config; hybrid fields from ``student_fields``."""
    family = teacher_config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise XmergeError(f"unsupported teacher architecture {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    c = teacher_config
    qkv_bias = True if family == "qwen2" else bool(getattr(c, "attention_bias", False))
    o_bias = False if family == "qwen2" else bool(getattr(c, "attention_bias", False))
    if family == "qwen2" and getattr(c, "use_sliding_window", False):
        raise XmergeError("Qwen2 teachers with use_sliding_window=True are not supported")
    return XLSTMStudentConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        attention_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        qk_norm=family == "olmo2",
        teacher_family=family,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        **student_fields,
    )


@torch.no_grad()
def init_new_parameters(student: XLSTMStudentForCausalLM, seed: int) -> None:
    """Feature maps = identity, gates from a dedicated generator, layer by layer in a fixed order."""
    cfg = student.config
    gen = torch.Generator().manual_seed(seed)
    for layer in student.model.layers:
        attn = layer.self_attn
        for fmap in (attn.fmap_q, attn.fmap_k):
            fmap.weight.copy_(torch.eye(fmap.weight.shape[-1]).expand_as(fmap.weight))
            fmap.bias.zero_()
        for gate in (attn.igate, attn.fgate, attn.ogate):
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen) * cfg.gate_weight_std)
        attn.igate.bias.fill_(cfg.igate_bias_init)
        attn.fgate.bias.copy_(torch.linspace(*cfg.fgate_bias_init, attn.heads))
        attn.ogate.bias.fill_(cfg.ogate_bias_init)


@torch.no_grad()
def convert_teacher(teacher, *, window: int = 512, sinks: int = 4, seed: int = 0, **student_fields) -> XLSTMStudentForCausalLM:
    """Build the fp32 student of ``teacher`` (a Llama/Qwen2/Olmo2 causal LM)."""
    config = student_config_from_teacher(teacher.config, window=window, sinks=sinks, init_seed=seed, **student_fields)
    student = XLSTMStudentForCausalLM(config)
    student_params = dict(student.named_parameters())
    teacher_state = {k: v for k, v in teacher.state_dict().items() if "rotary_emb" not in k}
    if config.tie_word_embeddings:  # the tied head is the embedding; state_dict lists it twice
        teacher_state.pop("lm_head.weight", None)
    for name, tensor in teacher_state.items():
        if name not in student_params:
            raise XmergeError(f"teacher tensor {name} has no place in the student (unsupported variant of {config.teacher_family})")
        if student_params[name].shape != tensor.shape:
            raise XmergeError(f"teacher tensor {name} has shape {tuple(tensor.shape)}, student expects {tuple(student_params[name].shape)}")
        student_params[name].copy_(tensor.float())
    missing = [n for n in student_params if n not in teacher_state and not is_new_parameter(n)]
    if missing:
        raise XmergeError(f"teacher lacks weights the student needs: {missing[:3]}")
    init_new_parameters(student, seed)
    return student.eval()


def model_card(teacher_spec: str, config: XLSTMStudentConfig) -> str:
    return (
        "---\nlibrary_name: transformers\ntags: [xmerge, xlstm, distillation]\n---\n"
        f"# Hybrid xLSTM student of `{teacher_spec}`\n\n"
        "Converted by xmerge: the teacher's attention blocks are replaced by a gated mix of an mLSTM\n"
        f"and sliding-window attention (window {config.window}, {config.sinks} sink tokens, mixer "
        f"`{config.mixer}`, init seed {config.init_seed}). All other weights are the teacher's.\n\n"
        "Load with `import xmerge` then `AutoModelForCausalLM.from_pretrained(dir)`.\n"
    )


def save_student(student, tokenizer, out_dir: Path, *, teacher_spec: str) -> Path:
    """Write model (safetensors), tokenizer and card to ``out_dir`` atomically (temp dir + rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise XmergeError(f"output directory {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(teacher_spec, student.config))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
