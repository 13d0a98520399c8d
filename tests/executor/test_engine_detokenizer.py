"""Incremental detokenization: deltas concatenate to the full decode; stop strings never leak."""

from __future__ import annotations

from executor_svc.engine.detokenizer import IncrementalDetokenizer
from executor_svc.engine.sampler import sample
from executor_svc.engine.sequence import Sequence
from executor_svc.engine.types import SamplingOptions


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
