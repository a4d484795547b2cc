"""Incremental detokenization with stop strings: what text a new token adds, held back while it
could still be an unfinished character or the start of a stop string."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out

    def push(self, token_id: int | None) -> tuple[str, bool]:
        """-> (new text safe to hand out, whether a stop string was hit)."""
        if token_id is not None:
            self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self.flush(), True
        self.text = text
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
        for s in self.stop:
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        delta = text[self.emitted : max(safe, self.emitted)]
        self.emitted = max(safe, self.emitted)
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
