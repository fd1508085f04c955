"""Domain data: math generator, presets, user data, packing, fingerprint and bad-input errors."""

from __future__ import annotations

import hashlib
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from xmerge.errors import XmergeError
from xmerge.experts import chatgen
from xmerge.experts.data import blocks_for_tokens, load_domain, take_tokens
from xmerge.experts.mathgen import math_problems, split_of
from xmerge.tests.common import tiny_teacher, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def decode_all(tok, blocks: torch.Tensor) -> str:
    return tok.decode(blocks.reshape(-1).tolist())


# ---- mathgen


def test_math_problems_deterministic_disjoint_and_correct():
    train, heldout = math_problems(3000, "train"), math_problems(500, "heldout")
    assert train == math_problems(3000, "train")
    assert heldout == math_problems(500, "heldout")
    assert train != math_problems(3000, "train", seed=1)
    train_q = {p.question for p in train} | {p.question for p in math_problems(3000, "train", seed=1)}
    assert len({p.question for p in train}) == 3000  # no duplicates within a split
    assert not train_q & {p.question for p in heldout}
    assert all(split_of(p.question) == "heldout" for p in heldout)
    for p in train[:500] + heldout:
        assert p.text == f"Question: {p.question}\nAnswer: {p.solution}"
        assert p.solution.endswith(f"The answer is {p.answer}.")
        assert int(re.findall(r"-?\d+", p.text)[-1]) == p.answer and p.answer >= 0
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", p.solution):
            assert eval(f"{a} {op} {b}") == int(c), p.solution  # every worked step is right


def test_math_problems_bad_arguments():
    with pytest.raises(XmergeError, match="unknown math split"):
        math_problems(1, "test")
    with pytest.raises(XmergeError, match=">= 0"):
        math_problems(-1, "train")


# ---- presets


def test_math_preset_deterministic_and_heldout_disjoint(tmp_path, tok):
    kw = dict(seq_len=64, cache_dir=tmp_path, max_train_tokens=64 * 200, max_heldout_tokens=64 * 20)
    a, b = load_domain("math", tok, **kw), load_domain("math", tok, **kw)
    assert a.train.shape == (200, 64) and a.heldout.shape == (20, 64) and a.train.dtype == torch.int64
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert load_domain("math", tok, **{**kw, "seq_len": 32}).fingerprint != a.fingerprint
    train_text, heldout_text = decode_all(tok, a.train), decode_all(tok, a.heldout)
    assert train_text.startswith("Question: ") and "<|im_end|>Question: " in train_text  # eos between docs
    problems = a.math_problems_heldout
    assert problems == math_problems(len(problems), "heldout") and len(problems) > 5
    assert all(p.question in heldout_text for p in problems[:-1])
    assert not any(p.question in train_text for p in problems)


def test_code_preset_uses_stdlib_sources(tmp_path, tok):
    kw = dict(seq_len=128, cache_dir=tmp_path, max_train_tokens=128 * 64, max_heldout_tokens=128 * 16)
    a, b = load_domain("code", tok, **kw), load_domain("code", tok, **kw)
    assert a.train.shape == (64, 128) and a.heldout.shape == (16, 128)
    assert torch.equal(a.train, b.train) and a.fingerprint == b.fingerprint and a.math_problems_heldout is None
    train_text, heldout_text = decode_all(tok, a.train), decode_all(tok, a.heldout)
    assert "def " in train_text and "import " in train_text
    assert heldout_text[:500] not in train_text


def test_chat_preset_answers_once_then_reads_cache(tmp_path, tok):
    kw = dict(seq_len=64, cache_dir=tmp_path, chat_max_new_tokens=4, max_train_tokens=1024, max_heldout_tokens=256)
    teacher = tiny_teacher()
    a = load_domain("chat", tok, teacher=teacher, **kw)
    cached = list((tmp_path / "chat").glob("*.jsonl"))
    assert len(cached) == 1
    rows = [json.loads(line) for line in cached[0].read_text().splitlines()]
    assert [r["prompt"] for r in rows] == list(chatgen.CHAT_PROMPTS)  # the first 120 fill these budgets

    def no_generation(*args, **kwargs):
        raise AssertionError("teacher must not generate again")

    generate = teacher.generate
    teacher.generate = no_generation
    b = load_domain("chat", tok, teacher=teacher, **kw)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout) and a.fingerprint == b.fingerprint
    train_text, heldout_text = decode_all(tok, a.train), decode_all(tok, a.heldout)
    assert "<|im_start|>user\nExplain why the sky looks blue" in train_text + heldout_text
    assert "<|im_start|>assistant\n" in train_text
    heldout_prompts = [p for p in chatgen.CHAT_PROMPTS if p in heldout_text]
    assert heldout_prompts and not any(p in train_text for p in heldout_prompts)

    # a bigger budget answers more prompts, and only the new ones
    answered = []

    def counting_generate(input_ids, **kwargs):
        answered.append(len(input_ids))
        return generate(input_ids=input_ids, **kwargs)

    teacher.generate = counting_generate
    big = load_domain("chat", tok, teacher=teacher, **{**kw, "max_train_tokens": 30_000})
    rows = [json.loads(line) for line in cached[0].read_text().splitlines()]
    n = len(rows)
    assert 120 < n < len(chatgen.ALL_PROMPTS) and sum(answered) == n - 120
    assert [r["prompt"] for r in rows] == list(chatgen.ALL_PROMPTS[:n])
    assert big.train.numel() >= 30_000 - 64 and big.fingerprint != a.fingerprint
    assert decode_all(tok, big.heldout).startswith(heldout_text[:200])  # held-out prompts stay held out


# ---- user data


def heldout_by_spec(text: str) -> bool:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100 < 10


def expected_stream(tok, texts: list[str]) -> list[int]:
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


TEXTS = [f"Document {i}: the {['red', 'green', 'blue'][i % 3]} fox jumps over {i * 7} lazy dogs." for i in range(80)]


def test_jsonl_text_packs_documents_in_order(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS) + "\n")  # blank line is fine
    d = load_domain("legal", tok, seq_len=32, data=str(path), cache_dir=tmp_path)
    assert d.name == "legal"
    train = expected_stream(tok, [t for t in TEXTS if not heldout_by_spec(t)])
    heldout = expected_stream(tok, [t for t in TEXTS if heldout_by_spec(t)])
    assert d.train.reshape(-1).tolist() == train[: len(train) // 32 * 32]
    assert d.heldout.reshape(-1).tolist() == heldout[: len(heldout) // 32 * 32]


def test_parquet_and_saved_dataset_give_same_blocks_as_jsonl(tmp_path, tok):
    import datasets

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": TEXTS, "id": list(range(len(TEXTS)))}), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(saved))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part.jsonl").write_text(jsonl.read_text())
    ref = load_domain("x", tok, seq_len=32, data=str(jsonl), cache_dir=tmp_path)
    for source in (parquet, saved, folder):
        d = load_domain("x", tok, seq_len=32, data=str(source), cache_dir=tmp_path)
        assert torch.equal(d.train, ref.train) and torch.equal(d.heldout, ref.heldout), source


def test_messages_rendered_with_chat_template(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    records = [{"messages": [{"role": "user", "content": f"question {i}?"},
                             {"role": "assistant", "content": f"answer {i}."}]} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    d = load_domain("support", tok, seq_len=32, data=str(path), cache_dir=tmp_path)
    text = decode_all(tok, torch.cat([d.train, d.heldout]))
    assert "<|im_start|>user\nquestion 1?<|im_end|>\n<|im_start|>assistant\nanswer 1.<|im_end|>\n" in text


# ---- budgets


def test_take_tokens_rounds_up_and_wraps():
    blocks = torch.arange(12).view(4, 3)
    assert blocks_for_tokens(7, 3) == 3 and blocks_for_tokens(0, 3) == 0
    assert torch.equal(take_tokens(blocks, 7), blocks[:3])
    assert torch.equal(take_tokens(blocks, 18), torch.cat([blocks, blocks[:2]]))
    with pytest.raises(XmergeError, match="token budget must be >= 0"):
        take_tokens(blocks, -1)


# ---- bad input


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case, match", [
    ("unknown", "unknown domain 'poetry'"),
    ("missing", "not found"),
    ("empty", "is empty"),
    ("neither", r"line 2 has neither a 'text' string nor chat 'messages'"),
    ("malformed", r"line 3 is not valid JSON"),
    ("not_object", r"line 1 is not a JSON object"),
    ("bad_messages", r"line 1: 'messages' must be"),
    ("too_long", r"seq_len 4096 is larger than .* holds \d+ train and \d+ held-out tokens"),
    ("chat_no_teacher", "chat preset needs the teacher"),
    ("no_hf_cache", "cannot load dataset 'nobody-xyz/not-cached' offline"),
    ("bad_seq_len", "seq_len must be >= 1"),
])
def test_bad_input_is_one_clear_error(tmp_path, tok, case, match):
    domain, data, seq_len = "mine", None, 32
    if case == "unknown":
        domain = "poetry"
    elif case == "missing":
        data = str(tmp_path / "absent.jsonl")
    elif case == "empty":
        data = write(tmp_path / "e.jsonl", "\n\n")
    elif case == "neither":
        data = write(tmp_path / "n.jsonl", '{"text": "ok"}\n{"body": "no"}\n')
    elif case == "malformed":
        data = write(tmp_path / "m.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    elif case == "not_object":
        data = write(tmp_path / "o.jsonl", '["text"]\n')
    elif case == "bad_messages":
        data = write(tmp_path / "b.jsonl", '{"messages": [{"role": "user"}]}\n')
    elif case == "too_long":
        data, seq_len = write(tmp_path / "t.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in TEXTS)), 4096
    elif case == "chat_no_teacher":
        domain = "chat"
    elif case == "no_hf_cache":
        data = "nobody-xyz/not-cached"
    elif case == "bad_seq_len":
        seq_len = 0
    with pytest.raises(XmergeError, match=match):
        load_domain(domain, tok, seq_len=seq_len, data=data, cache_dir=tmp_path)


def test_chat_answers_need_no_pad_token(tok):
    """GGUF tokenizers (the real teacher's) come without a pad token; left padding uses eos then."""
    teacher, prompts = tiny_teacher(), list(chatgen.CHAT_PROMPTS[:3])
    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    answers = chatgen.answer_prompts(teacher, no_pad, prompts, max_new_tokens=3, progress=False)
    assert answers == chatgen.answer_prompts(teacher, tok, prompts, max_new_tokens=3, progress=False)
    assert len(answers) == 3
