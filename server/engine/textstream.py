"""Incremental detokenization with stop strings: what text a new token adds, held back while it
could still be an unfinished character or the start of a stop string.

Each token is decoded together with the few tokens before it (`_prefix:` below) so that spacing
that depends on the previous token comes out right, without decoding the whole sequence again.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.longest_stop = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # the text so far (cut at a stop string once one is hit)
        self.emitted = 0  # characters of `text` already handed out
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text`
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int | None) -> tuple[str, bool]:
        """-> (new text safe to hand out, whether a stop string was hit). None: no new token."""
        if token_id is not None:
            self.ids.append(token_id)
            before = self._decode(self.ids[self._prefix:self._read])
            after = self._decode(self.ids[self._prefix:])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self._prefix, self._read = self._read, len(self.ids)
        start = max(self.emitted - self.longest_stop, 0)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self._prefix = self._read = len(self.ids)  # nothing after the stop string counts
            return self.flush(), True
        safe = len(self.text)
        for s in self.stop:  # hold back a tail that could begin a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if self.text.endswith(s[:n]):
                    safe = min(safe, len(self.text) - n)
                    break
        delta = self.text[self.emitted:max(safe, self.emitted)]
        self.emitted = max(safe, self.emitted)
        return delta, False

    def flush(self) -> str:
        """The text held back so far (the sequence has finished)."""
        if self._read < len(self.ids):  # an unfinished character at the end
            self.text += self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self._prefix = self._read = len(self.ids)
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta
