"""Incremental detokenization with stop strings that never leak partially.

Each push decodes the request's whole completion (so the deltas always concatenate to
``tokenizer.decode(all_ids, skip_special_tokens=True)``, whatever the tokenizer's merge and
space rules) and emits only the new, settled part of the text:

- text ending in U+FFFD (a multi-byte character cut between tokens) is held back;
- a tail that is a prefix of some stop string is held back until it is decided;
- when a stop string appears, the text before it is emitted and the request stops; the stop
  string itself is not part of the output.

Example (stop = ["\\n\\n"]): deltas "Hello", " world", "\\n" is held (could start "\\n\\n"),
then "\\n" arrives -> stop: nothing more is emitted, finish_reason "stop".
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str], min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.min_tokens = min_tokens
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.checked = 0  # characters already searched for stop strings

    def push(self, new_ids: list[int], final: bool = False) -> tuple[str, bool]:
        """Add tokens; returns (text delta, stopped)."""
        self.ids.extend(new_ids)
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop and len(self.ids) >= self.min_tokens:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.checked - longest + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            self.checked = len(text)
            if hits:
                return self._emit(text, min(hits)), True
        elif self.stop:
            self.checked = len(text)
        if final:
            return self._emit(text, len(text)), False
        end = len(text)
        if text.endswith("\ufffd"):
            end = len(text.rstrip("\ufffd"))
        end -= self._held_tail(text[:end])
        return self._emit(text, max(end, self.sent)), False

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, text: str, end: int) -> str:
        delta = text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta
