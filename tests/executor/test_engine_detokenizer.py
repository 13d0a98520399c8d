"""Incremental detokenization: deltas concatenate to the full decode; stop strings never leak."""

from __future__ import annotations

import random

import pytest

from executor_svc.engine.detokenizer import IncrementalDetokenizer
from executor_svc.engine.sampler import sample
from executor_svc.engine.sequence import Sequence
from executor_svc.engine.types import SamplingOptions
from loraserve.devmodels import build_tokenizer


class CharTokenizer:
    """id -> piece; piece "\\ufffd" mimics half of a multi-byte character."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids)
        return text.replace("\ufffd\ufffd", "é")  # two halves make one character


PIECES = ["Hel", "lo", " wor", "ld", "\n", "\ufffd", "!", "EN", "D", "x"]


def run(ids, stop, final_at_end=True):
    d = IncrementalDetokenizer(CharTokenizer(PIECES), stop)
    deltas, stopped = [], False
    for n, i in enumerate(ids):
        delta, stopped = d.push([i], final=final_at_end and n == len(ids) - 1)
        deltas.append(delta)
        if stopped:
            break
    return deltas, stopped


def test_deltas_concatenate_and_hold_back_partial_characters():
    ids = [0, 1, 5, 5, 2, 3, 6]
    deltas, _ = run(ids, [])
    assert "".join(deltas) == CharTokenizer(PIECES).decode(ids)
    assert deltas[2] == "" and deltas[3] == "é"


def test_stop_string_never_leaks():
    deltas, stopped = run([0, 1, 4, 7, 8, 6], ["\nEND"])
    assert stopped and "".join(deltas) == "Hello"
    assert all("\n" not in d for d in deltas)
    deltas, stopped = run([0, 4, 6, 4], ["\nEND"])  # "\n" held, then released as no stop
    assert not stopped and deltas[1] == "" and "".join(deltas) == "Hel\n!\n"


def test_min_tokens_bans_eos():
    import torch

    seq = Sequence("s", [1, 2], 2, SamplingOptions(min_tokens=2), [], max_tokens=5)
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert sample(logits.clone(), [seq], eos_ids=[1]) == [2]
    seq.token_ids += [2, 2]
    assert sample(logits.clone(), [seq], eos_ids=[1]) == [1]


TEXT = "Hello world. Größe, naïve café — 日本語のテキスト 🙂 and more\n\nEND of it. " * 6


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """The dev models' byte-level BPE (trained on English text: most non-ASCII characters
    take several tokens, each holding part of a character's bytes)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("chunks", ["one", "random"])
def test_deltas_equal_the_full_decode_with_a_byte_level_bpe(bpe, chunks):
    """Pushed one token at a time or in chunks of 1-5, the deltas concatenate to the decode of
    all the ids; no delta ends in a cut character; special tokens are skipped."""
    rng = random.Random(3)
    ids = bpe(TEXT)["input_ids"]
    ids = ids[:40] + [bpe.eos_token_id] + ids[40:]  # a special token inside the text
    ids += [rng.randrange(len(bpe)) for _ in range(60)]  # random bytes: cut characters too
    d = IncrementalDetokenizer(bpe, [])
    deltas, i = [], 0
    while i < len(ids):
        n = 1 if chunks == "one" else rng.randint(1, 5)
        deltas.append(d.push(ids[i : i + n], final=i + n >= len(ids))[0])
        i += n
    assert "".join(deltas) == bpe.decode(ids, skip_special_tokens=True)
    assert not any(x.endswith("\ufffd") for x in deltas[: len(deltas) * 2 // 5])


def test_stop_string_across_byte_level_tokens(bpe):
    """A stop string found in text decoded window by window: the text before it, nothing after."""
    ids = bpe(TEXT)["input_ids"]
    d = IncrementalDetokenizer(bpe, ["\n\nEND"])
    out, stopped = "", False
    for i in ids:
        delta, stopped = d.push([i])
        out += delta
        if stopped:
            break
    assert stopped and out == TEXT[: TEXT.index("\n\nEND")]


def test_each_push_decodes_a_short_window(bpe):
    """The cost of a push does not grow with the completion: every decode call sees a few
    tokens, not all of them (it was the whole completion: O(n) a token)."""
    seen = []

    class Counting:  # the real tokenizer, its decode calls counted
        def decode(self, ids, skip_special_tokens=True):
            seen.append(len(ids))
            return bpe.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = bpe(TEXT * 3)["input_ids"]
    d = IncrementalDetokenizer(Counting(), ["\n\nEND!"])
    text = "".join(d.push([i])[0] for i in ids)
    assert text == bpe.decode(ids, skip_special_tokens=True)
    assert len(ids) > 1000 and max(seen) <= 12
