"""Teacher top-k targets: shard contents against a direct top-k, reuse, crash safety, teacher hash."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from xmerge.errors import XmergeError
from xmerge.experts.targets import build_targets, find_targets, teacher_hash
from xmerge.tests.common import TINY_VOCAB, tiny_teacher

N_BLOCKS, SEQ_LEN = 10, 24


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, TINY_VOCAB, (N_BLOCKS, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def reference_topk(teacher, blocks, k, batch_size):
    """Top-k of the teacher's float32 log-softmax, batch by batch as the builder runs it."""
    indices, values = [], []
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            logprobs = torch.log_softmax(teacher(blocks[start:start + batch_size]).logits.float(), dim=-1)
            top = logprobs.topk(k, dim=-1)
            indices.append(top.indices)
            values.append(top.values)
    return torch.cat(indices), torch.cat(values)


def build(teacher, blocks, tmp_path, **kw):
    args = dict(k=16, teacher_hash="t" * 64, data_fingerprint="d" * 64, split="train", cache_dir=tmp_path,
                batch_size=2, shard_blocks=4, progress=False)
    return build_targets(teacher, blocks, **{**args, **kw})


class RaisingTeacher(torch.nn.Module):
    """A teacher whose forward fails after `ok_calls` successful calls."""

    def __init__(self, inner, ok_calls=0):
        super().__init__()
        self.inner, self.ok_calls, self.calls = inner, ok_calls, 0

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls > self.ok_calls:
            raise RuntimeError("teacher crashed")
        return self.inner(**kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmo2"])
def test_shards_equal_direct_topk_of_teacher(tmp_path, blocks, family):
    teacher = tiny_teacher(family)
    targets = build(teacher, blocks, tmp_path)
    ref_idx, ref_lp = reference_topk(teacher, blocks, 16, batch_size=2)
    assert targets.indices.shape == (N_BLOCKS, SEQ_LEN, 16) and len(targets) == N_BLOCKS
    assert targets.indices.dtype == torch.int32 and targets.logprobs.dtype == torch.float16
    assert torch.equal(targets.indices.long(), ref_idx)
    assert torch.equal(targets.logprobs, ref_lp.half())
    shards = sorted(targets.directory.glob("shard-*.safetensors"))
    assert len(shards) == 3  # 10 blocks in shards of 4
    last = load_file(shards[-1])
    assert last["indices"].shape == (2, SEQ_LEN, 16) and torch.equal(last["logprobs"], ref_lp[8:].half())
    idx, lp = targets.load(3, 9)  # spans three shards
    assert torch.equal(idx.long(), ref_idx[3:9]) and torch.equal(lp, ref_lp[3:9].half())
    meta = json.loads((targets.directory / "meta.json").read_text())
    assert meta["n_blocks"] == N_BLOCKS and meta["k"] == 16


def test_k_is_capped_at_vocab(tmp_path, blocks):
    targets = build(tiny_teacher(), blocks[:2], tmp_path, k=1000)
    assert targets.k == TINY_VOCAB and targets.logprobs.shape == (2, SEQ_LEN, TINY_VOCAB)
    probs = targets.logprobs.float().exp().sum(-1)  # the full distribution
    assert torch.allclose(probs, torch.ones_like(probs), atol=1e-2)


def test_second_build_reuses_cache_without_teacher(tmp_path, blocks):
    key_parts = dict(k=16, teacher_hash="t" * 64, data_fingerprint="d" * 64, split="train", cache_dir=tmp_path)
    assert find_targets(blocks, **key_parts) is None
    first = build(tiny_teacher(), blocks, tmp_path)
    assert find_targets(blocks, **key_parts).directory == first.directory
    raising = RaisingTeacher(tiny_teacher())
    again = build(raising, blocks, tmp_path)
    assert raising.calls == 0 and again.directory == first.directory
    assert torch.equal(again.indices, first.indices) and torch.equal(again.logprobs, first.logprobs)
    assert torch.equal(build(None, blocks, tmp_path).logprobs, first.logprobs)
    assert len(list((tmp_path / "targets").iterdir())) == 1


def test_key_separates_teacher_data_k_split_and_blocks(tmp_path, blocks):
    base = build(tiny_teacher(), blocks, tmp_path).directory.name
    variants = [dict(teacher_hash="u" * 64), dict(data_fingerprint="e" * 64), dict(k=8), dict(split="heldout")]
    names = {build(tiny_teacher(), blocks, tmp_path, **v).directory.name for v in variants}
    names.add(build(tiny_teacher(), blocks[:6], tmp_path).directory.name)
    assert len(names) == 5 and base not in names


def test_crashed_build_leaves_nothing_reusable(tmp_path, blocks):
    crashing = RaisingTeacher(tiny_teacher(), ok_calls=3)  # fails inside the second shard
    with pytest.raises(RuntimeError, match="teacher crashed"):
        build(crashing, blocks, tmp_path)
    assert list((tmp_path / "targets").iterdir()) == []  # neither a key dir nor a temporary one
    with pytest.raises(XmergeError, match="no cached teacher targets"):
        build(None, blocks, tmp_path)
    teacher = tiny_teacher()
    rebuilt = build(teacher, blocks, tmp_path)
    assert torch.equal(rebuilt.logprobs, reference_topk(teacher, blocks, 16, batch_size=2)[1].half())


def test_partial_directory_is_not_a_cache(tmp_path, blocks):
    """A key directory without meta.json (e.g. copied half-way) is not trusted."""
    done = build(tiny_teacher(), blocks, tmp_path)
    (done.directory / "meta.json").unlink()
    with pytest.raises(XmergeError, match="no cached teacher targets"):
        build(None, blocks, tmp_path)


def test_bad_arguments(tmp_path, blocks):
    with pytest.raises(XmergeError, match="must be >= 1"):
        build(tiny_teacher(), blocks, tmp_path, k=0)
    with pytest.raises(XmergeError, match="integer tensor"):
        build(tiny_teacher(), blocks.float(), tmp_path)
    with pytest.raises(XmergeError, match="outside the 10 cached"):
        build(tiny_teacher(), blocks, tmp_path).load(8, 11)


def test_teacher_hash_of_model_dir_and_file(tmp_path):
    a, b = tiny_teacher(seed=0), tiny_teacher(seed=0)
    assert teacher_hash(a) == teacher_hash(b)
    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    assert teacher_hash(a) != teacher_hash(b)
    assert teacher_hash(a.to(torch.bfloat16)) != teacher_hash(b.to(torch.bfloat16))

    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    dir_hash = teacher_hash(tmp_path / "a")
    assert dir_hash == teacher_hash(str(tmp_path / "a")) != teacher_hash(tmp_path / "b")
    (tmp_path / "a" / "config.json").write_text("{}")  # only weights count
    assert teacher_hash(tmp_path / "a") == dir_hash

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 5000)
    assert teacher_hash(gguf) == hashlib.sha256(gguf.read_bytes()).hexdigest()
    with pytest.raises(XmergeError, match="not found"):
        teacher_hash(tmp_path / "missing")
    with pytest.raises(XmergeError, match="no \\*.safetensors"):
        teacher_hash((tmp_path / "empty").mkdir() or tmp_path / "empty")
