"""Domain data: presets or user data -> packed (N, seq_len) token blocks, train and held-out.

Presets, all offline and deterministic:
- `math`: generated word problems (experts/mathgen.py); held-out = mathgen's held-out split.
- `code`: the running interpreter's standard-library .py sources (test folders excluded),
  ordered by the hash of their relative path; held-out = files whose path hash falls in 10 %.
- `chat`: built-in instructions answered by the teacher (experts/chatgen.py); held-out = the
  prompts whose hash falls in 20 %.
User data (`data=`): a .jsonl or .parquet file, a saved HF dataset directory, or the name of an HF
dataset already in the local cache; records carry `text`, or chat `messages` rendered with the
tokenizer's chat template. Held-out = records whose text hash falls in 10 %.

Packing: each document is tokenized (no special tokens added) and followed by the tokenizer's
eos; the documents of one split are concatenated and cut into (N, seq_len) blocks, the ragged
tail dropped. Blocks attend across document boundaries, as the paper's packed training does;
the eos token marks each boundary. The split is by document, so no held-out document shares a
block with training data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xmerge.errors import XmergeError
from xmerge.experts import chatgen, mathgen
from xmerge.experts.targets import teacher_hash

PRESETS = ("math", "code", "chat")
HELDOUT_PERCENT = 10
MATH_IDENTITY = "math/v1/seed=0"
TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class DomainData:
    name: str
    train: torch.Tensor  # (N, T) int64
    heldout: torch.Tensor  # (M, T) int64
    fingerprint: str  # sha256 of source identity, tokenizer vocab, seq_len and both token streams
    math_problems_heldout: list[mathgen.MathProblem] | None  # the problems packed into `heldout` (math only)

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def _in_heldout(key: str, percent: int) -> bool:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100 < percent


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id) and its eos token."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.eos_token]).encode()).hexdigest()


def _next_chunk(texts: Iterator[str], tokens_wanted: int) -> list[str]:
    """The next documents to tokenize together: up to 64, stopping once their characters
    reach the tokens still wanted (a token spans at least about one character)."""
    chunk, chars = [], 0
    for text in itertools.islice(texts, 64):
        chunk.append(text)
        chars += len(text)
        if chars >= tokens_wanted:
            break
    return chunk


def _pack(texts: Iterable[str], tokenizer, *, seq_len: int, max_blocks: int) -> tuple[torch.Tensor, int, int]:
    """(blocks (n, seq_len), tokens read, documents read); reads documents until max_blocks are full."""
    need = max_blocks * seq_len
    pieces: list[np.ndarray] = []
    n_tokens = n_docs = 0
    eos = [tokenizer.eos_token_id]
    texts = iter(texts)
    while n_tokens < need and (chunk := _next_chunk(texts, need - n_tokens)):
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            pieces.append(np.asarray(ids + eos, dtype=np.int64))
            n_tokens += len(ids) + 1
            n_docs += 1
            if n_tokens >= need:
                break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n_blocks = min(n_tokens // seq_len, max_blocks)
    return torch.from_numpy(stream[: n_blocks * seq_len].copy()).view(n_blocks, seq_len), n_tokens, n_docs


def _code_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in TEST_DIRS]
        files += [(Path(folder, n).relative_to(root).as_posix(), Path(folder, n)) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda rel_path: hashlib.sha256(rel_path[0].encode()).hexdigest())


def _read_code(files: list[tuple[str, Path]]) -> Iterator[str]:
    for _, path in files:
        if text := path.read_text(encoding="utf-8", errors="replace").strip():  # empty __init__.py: no document
            yield text + "\n"


def _records_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise XmergeError(f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise XmergeError(f"{path} line {number} is not a JSON object; each line must be "
                              '{"text": ...} or {"messages": [...]}')
        records.append((f"line {number}", record))
    return records


def _records_hf(data: str) -> list[tuple[str, dict]]:
    import datasets

    path = Path(data)
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            dataset = datasets.load_from_disk(str(path))
        else:
            offline = datasets.config.HF_HUB_OFFLINE
            datasets.config.HF_HUB_OFFLINE = True  # cached data only: never reach the network
            try:
                dataset = datasets.load_dataset(str(path) if path.is_dir() else data)
            finally:
                datasets.config.HF_HUB_OFFLINE = offline
    except Exception as exc:
        raise XmergeError(f"cannot load dataset {data!r} offline ({type(exc).__name__}: {exc}); pass a .jsonl/.parquet "
                          "file, a saved dataset directory, or the name of a dataset already in the HF cache") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise XmergeError(f"dataset {data!r} has splits {sorted(dataset)} but no 'train' split to read")
        dataset = dataset["train"]
    return [(f"row {i}", row) for i, row in enumerate(dataset)]


def _read_records(data: str) -> list[tuple[str, dict]]:
    """[(where, record)] from a user data source."""
    path = Path(data).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".parquet") or path.is_file():
        if not path.is_file():
            raise XmergeError(f"data file {path} not found")
        if suffix == ".jsonl":
            return _records_jsonl(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as exc:
                raise XmergeError(f"cannot read parquet file {path} ({exc})") from None
            return [(f"row {i}", row) for i, row in enumerate(rows)]
        raise XmergeError(f"data file {path} is neither .jsonl nor .parquet")
    return _records_hf(data)


def _record_text(where: str, record: dict, tokenizer, source: str) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return chatgen.render_chat(tokenizer, messages)
    if messages is not None:
        raise XmergeError(f"{source} {where}: 'messages' must be a non-empty list of "
                          '{"role": str, "content": str}')
    raise XmergeError(f"{source} {where} has neither a 'text' string nor chat 'messages'; "
                      f"its fields are {sorted(record)}")


def _user_texts(data: str, tokenizer) -> tuple[str, list[str], list[str]]:
    records = _read_records(data)
    if not records:
        raise XmergeError(f"dataset {data} is empty: it holds no records")
    texts = [_record_text(where, record, tokenizer, data) for where, record in records]
    identity = f"data/{Path(data).name if Path(data).exists() else data}"
    train = [t for t in texts if not _in_heldout(t, HELDOUT_PERCENT)]
    heldout = [t for t in texts if _in_heldout(t, HELDOUT_PERCENT)]
    return identity, train, heldout


def _chat_texts(tokenizer, teacher, cache_dir: Path, max_new_tokens: int, tokens_wanted: tuple[int, int]
                ) -> tuple[str, list[str], list[str]]:
    """Identity, train and held-out conversations of the first n built-in prompts, n the smallest
    step (from 120, growing by the measured tokens per prompt) that fills ``tokens_wanted``
    (train, held-out), or all prompts."""
    if teacher is None:
        raise XmergeError("the chat preset needs the teacher: it answers the built-in prompts once "
                          "(cached afterwards)")
    t_hash, tok_hash = teacher_hash(teacher), tokenizer_hash(tokenizer)
    n = len(chatgen.CHAT_PROMPTS)
    while True:
        rows = chatgen.chat_conversations(teacher, tokenizer, list(chatgen.ALL_PROMPTS[:n]), cache_dir=cache_dir,
                                          teacher_hash=t_hash, tokenizer_hash=tok_hash,
                                          max_new_tokens=max_new_tokens)
        split: tuple[list[str], list[str]] = ([], [])
        for row in rows:
            text = chatgen.render_chat(tokenizer, [{"role": "user", "content": row["prompt"]},
                                                   {"role": "assistant", "content": row["answer"]}])
            split[_in_heldout(row["prompt"], chatgen.HELDOUT_PERCENT)].append(text)
        have = [sum(len(ids) + 1 for ids in tokenizer(texts)["input_ids"]) if texts else 1 for texts in split]
        growth = max(want / got for want, got in zip(tokens_wanted, have))
        if growth <= 1 or n == len(chatgen.ALL_PROMPTS):
            break
        n = min(len(chatgen.ALL_PROMPTS), math.ceil(n * growth * 1.1))
    return f"chat/v2/teacher={t_hash}/max_new_tokens={max_new_tokens}/prompts={n}", split[0], split[1]


def load_domain(domain: str, tokenizer, *, seq_len: int, data: str | None = None, cache_dir: Path,
                teacher=None, max_train_tokens: int = 1 << 21, max_heldout_tokens: int = 1 << 16,
                chat_max_new_tokens: int = 128) -> DomainData:
    """Packed train / held-out blocks of a preset (`math`, `code`, `chat`) or of user `data`.

    At most max_train_tokens / max_heldout_tokens are packed (both rounded down to whole
    blocks). `teacher` (an HF causal LM) is needed only by `chat`, whose answers are at most
    chat_max_new_tokens long. Same inputs, same tensors
    and fingerprint.
    """
    if seq_len < 1:
        raise XmergeError(f"seq_len must be >= 1, got {seq_len}")
    if max_train_tokens < seq_len or max_heldout_tokens < seq_len:
        raise XmergeError(f"token caps ({max_train_tokens} train, {max_heldout_tokens} held-out) must each hold "
                          f"at least one block of seq_len {seq_len}")
    if tokenizer.eos_token_id is None:
        raise XmergeError("the tokenizer has no eos token, which packing needs to separate documents")
    max_train, max_heldout = max_train_tokens // seq_len, max_heldout_tokens // seq_len
    source = f"data {data}" if data is not None else f"preset {domain!r}"
    if data is not None:
        identity, train_texts, heldout_texts = _user_texts(data, tokenizer)
    elif domain == "math":
        identity = MATH_IDENTITY
        train_texts = (p.text for p in mathgen.iter_math_problems("train"))
        heldout_texts = (p.text for p in mathgen.iter_math_problems("heldout"))
    elif domain == "code":
        files = _code_files()
        identity = f"code/python-{'.'.join(map(str, sys.version_info[:3]))}"
        train_texts = _read_code([f for f in files if not _in_heldout(f[0], HELDOUT_PERCENT)])
        heldout_texts = _read_code([f for f in files if _in_heldout(f[0], HELDOUT_PERCENT)])
    elif domain == "chat":
        identity, train_texts, heldout_texts = _chat_texts(tokenizer, teacher, Path(cache_dir), chat_max_new_tokens,
                                                           (max_train_tokens, max_heldout_tokens))
    else:
        raise XmergeError(f"unknown domain {domain!r}: use a preset ({', '.join(PRESETS)}) or pass your own "
                          "data (--data FILE.jsonl|FILE.parquet|HF dataset)")

    train, train_tokens, _ = _pack(train_texts, tokenizer, seq_len=seq_len, max_blocks=max_train)
    heldout, heldout_tokens, heldout_docs = _pack(heldout_texts, tokenizer, seq_len=seq_len, max_blocks=max_heldout)
    if len(train) == 0 or len(heldout) == 0:
        raise XmergeError(f"seq_len {seq_len} is larger than the {source} can fill: "
                          f"it holds {train_tokens} train and {heldout_tokens} held-out tokens, and each split "
                          f"needs at least {seq_len}; lower --seq-len or add data")

    digest = hashlib.sha256(json.dumps([identity, tokenizer_hash(tokenizer), seq_len]).encode())
    digest.update(train.numpy().tobytes())
    digest.update(heldout.numpy().tobytes())
    return DomainData(
        name=domain,
        train=train,
        heldout=heldout,
        fingerprint=digest.hexdigest(),
        math_problems_heldout=mathgen.math_problems(heldout_docs, "heldout") if identity == MATH_IDENTITY else None,
    )


def blocks_for_tokens(tokens: int, seq_len: int) -> int:
    """Number of seq_len blocks a token budget asks for (rounded up)."""
    if tokens < 0:
        raise XmergeError(f"token budget must be >= 0, got {tokens}")
    return -(-tokens // seq_len)


def take_tokens(blocks: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first blocks covering `tokens` (rounded up to whole blocks). blocks: (N, T) -> (K, T).

    A budget beyond the data wraps around to its first block again (another epoch, same order).
    """
    n = blocks_for_tokens(tokens, blocks.shape[1])
    if n <= len(blocks):
        return blocks[:n]
    return blocks[torch.arange(n) % len(blocks)]
