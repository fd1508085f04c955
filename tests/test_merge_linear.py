"""Streaming linear merge: exact Σλθ, mergekit bit-equality, layout checks, and nothing written on bad input."""

import json

import pytest
import torch
from mergekit.config import InputModelDefinition, MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xmerge.errors import XmergeError
from xmerge.merge.safetensors_io import read_layout
from xmerge.merge.linear import merge_linear
from xmerge.merge.mergekit_methods import _reference, register_student_architecture
from xmerge.merge.safetensors_io import StreamingSafetensorsWriter
from xmerge.tests.merge_fixtures import perturbed, random_tensors, student_shapes, write_student

WEIGHTS = [0.35, 0.35, 0.2, 0.1]


def make_experts(root, family="llama", dtype=torch.float32, n=4, **shape_kwargs):
    seed = random_tensors(student_shapes(family, **shape_kwargs), 0, dtype)
    return [write_student(root / f"expert{i}", perturbed(seed, i + 1), family) for i in range(n)]


def direct_sum(experts, weights):
    """Σ λ_i θ_i from fully loaded files: fp32 fused multiply-add in expert order, cast back."""
    tensors = [load_file(e / "model.safetensors") for e in experts]
    out = {}
    for name, first in tensors[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float32)
        for t, w in zip(tensors, weights):
            acc.addcmul_(t[name], torch.tensor(w, dtype=torch.float32))
        out[name] = acc.to(first.dtype)
    return out


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("family, chunk", [("llama", 1 << 20), ("qwen2", 1 << 20), ("olmo2", 1 << 20), ("llama", 777)])
def test_linear_equals_weighted_sum_exactly(tmp_path, family, chunk):
    experts = make_experts(tmp_path, family, tied=family == "llama")
    out = merge_linear(experts, WEIGHTS, tmp_path / "merged", chunk_elements=chunk)
    merged = load_file(out / "model.safetensors")
    expected = direct_sum(experts, WEIGHTS)
    assert merged.keys() == expected.keys()
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name
    # and it is Σλθ: within fp32 rounding of a float64 computation
    inputs = [load_file(e / "model.safetensors") for e in experts]
    for name in expected:
        exact = sum(w * t[name].double() for w, t in zip(WEIGHTS, inputs))
        torch.testing.assert_close(merged[name].double(), exact, rtol=1e-6, atol=1e-6)
    assert read_layout(out / "model.safetensors") == read_layout(experts[0] / "model.safetensors")
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert json.loads((out / "config.json").read_text()) == json.loads((experts[0] / "config.json").read_text())


@pytest.mark.parametrize("dtype, chunk", [(torch.float32, 1 << 20), (torch.bfloat16, 1 << 20), (torch.bfloat16, 1000)])
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_is_bit_identical_to_mergekit(tmp_path, dtype, chunk, normalize):
    experts = make_experts(tmp_path, "qwen2", dtype, hidden=64, intermediate=96, vocab=300)
    weights = [0.5, 0.3, 0.4, 0.1]  # sum 1.3, so normalize matters
    merged = merge_linear(experts, weights, tmp_path / "ours", normalize=normalize, chunk_elements=chunk)
    ours = load_file(merged / "model.safetensors")
    register_student_architecture()
    config = MergeConfiguration(
        merge_method="linear",
        models=[InputModelDefinition(model=_reference(e), parameters={"weight": w}) for e, w in zip(experts, weights)],
        parameters={"normalize": normalize},
        dtype="float32",
        out_dtype=str(dtype).removeprefix("torch."),
    )
    run_merge(config, str(tmp_path / "mergekit"), MergeOptions(quiet=True, copy_tokenizer=False))
    theirs = load_file(tmp_path / "mergekit" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == dtype and torch.equal(ours[name], theirs[name]), name


def test_streaming_writer_round_trips_through_safetensors(tmp_path):
    tensors = {
        "b.scalar": torch.tensor(3.5, dtype=torch.float64),
        "a.matrix": torch.randn(7, 5).to(torch.bfloat16),
        "c.empty": torch.zeros(0, 4, dtype=torch.float16),
        "d.cube": torch.randn(3, 2, 5),
    }
    save_file(tensors, tmp_path / "ref.safetensors")
    layout, _ = read_layout(tmp_path / "ref.safetensors")
    with StreamingSafetensorsWriter(tmp_path / "out.safetensors", layout, {"k": "v"}) as writer:
        for name in layout:
            writer.write(name, tensors[name])
    loaded = load_file(tmp_path / "out.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], tensors[n]) and loaded[n].dtype == tensors[n].dtype for n in tensors)
    assert read_layout(tmp_path / "out.safetensors") == (layout, {"k": "v"})


def test_streaming_writer_leaves_no_file_when_incomplete(tmp_path):
    tensors = {"a": torch.ones(2), "b": torch.ones(3)}
    save_file(tensors, tmp_path / "ref.safetensors")
    layout, _ = read_layout(tmp_path / "ref.safetensors")
    with pytest.raises(XmergeError, match="only 1 of 2"):
        with StreamingSafetensorsWriter(tmp_path / "out.safetensors", layout, {}) as writer:
            writer.write("a", tensors["a"])
    with pytest.raises(XmergeError, match=r"header says F32\[3\]"):
        with StreamingSafetensorsWriter(tmp_path / "out.safetensors", layout, {}) as writer:
            writer.write("a", tensors["a"])
            writer.write("b", torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.safetensors"]


def test_linear_handles_scalar_and_empty_tensors(tmp_path):
    experts = []
    for i in range(3):
        (tmp_path / f"e{i}").mkdir()
        tensors = {"scalar": torch.tensor(float(i + 1)), "empty": torch.zeros(0, 3), "vector": torch.arange(5.0) * i}
        save_file(tensors, tmp_path / f"e{i}" / "model.safetensors")
        experts.append(tmp_path / f"e{i}")
    merged = load_file(merge_linear(experts, [0.5, 0.25, 0.25], tmp_path / "out", chunk_elements=2) / "model.safetensors")
    assert merged["scalar"].shape == () and merged["scalar"].item() == 0.5 * 1 + 0.25 * 2 + 0.25 * 3
    assert merged["empty"].shape == (0, 3)
    assert torch.equal(merged["vector"], torch.arange(5.0) * 0.75)


def _rewrite(model_dir, change):
    tensors = load_file(model_dir / "model.safetensors")
    change(tensors)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda t: t.__setitem__("model.norm.weight", torch.ones(5)), r"tensor model.norm.weight is F32\[5\] in .*expert2"),
        (lambda t: t.pop("model.layers.1.self_attn.ogate.bias"), "model.layers.1.self_attn.ogate.bias .* missing from .*expert2"),
        (lambda t: t.__setitem__("extra.weight", torch.ones(2)), "tensor extra.weight of .*expert2/model.safetensors is not in"),
        (lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].half()), "F16.* in .*expert2"),
        (lambda t: t["model.layers.0.self_attn.fmap_q.weight"].view(-1).__setitem__(5, float("nan")),
         "expert2 has NaN/inf in tensor model.layers.0.self_attn.fmap_q.weight"),
        (lambda t: t["model.embed_tokens.weight"].view(-1).__setitem__(0, float("inf")),
         "expert2 has NaN/inf in tensor model.embed_tokens.weight"),
    ],
)
def test_bad_experts_raise_and_write_nothing(tmp_path, change, fragment):
    experts = make_experts(tmp_path)
    _rewrite(experts[2], change)
    out = tmp_path / "merged"
    with pytest.raises(XmergeError, match=fragment):
        merge_linear(experts, WEIGHTS, out)
    assert_nothing_written(out)


def test_refuses_existing_output_and_wrong_weight_count(tmp_path):
    experts = make_experts(tmp_path, n=2)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(XmergeError, match="already exists"):
        merge_linear(experts, [0.5, 0.5], tmp_path / "taken")
    with pytest.raises(XmergeError, match="2 experts but 3 weights"):
        merge_linear(experts, [0.5, 0.3, 0.2], tmp_path / "merged")
    with pytest.raises(XmergeError, match="no model.safetensors"):
        merge_linear([experts[0], tmp_path / "taken"], [0.5, 0.5], tmp_path / "merged")
    assert_nothing_written(tmp_path / "merged")
    # an existing empty directory is fine
    (tmp_path / "empty").mkdir()
    assert (merge_linear(experts, [0.5, 0.5], tmp_path / "empty") / "model.safetensors").is_file()
