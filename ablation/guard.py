"""The markup guard: once a profile's edit has switched on in a sequence, tokens that open or close an
HTML/XML tag are not sampled, so the text that replaces a forgotten answer cannot show `</strong>`-style
debris. Both engines apply it to the logits of each row whose profile asks for it (`markup_guard`)."""

from __future__ import annotations

import re

import torch

# a token that starts a tag ("<em>", "</strong>", "</", "<div") or ends a self-closing one ("/>")
TAG_PIECE = re.compile(r"</?[A-Za-z]|</|/>")
# control tokens that look like tags: <bos>, <eos>, <start_of_turn>, <end_of_image>, <unused12> …
CONTROL = re.compile(r"^<(?:[a-z]+_[a-z_]+|unused\d+|bos|eos|pad|unk|mask)>$")


def markup_token_ids(tok) -> list[int]:
    """The vocabulary's tag pieces (Gemma has whole tags such as `<em>` among its added tokens), control
    and special tokens excepted."""
    special = set(tok.all_special_ids)
    return sorted(i for t, i in tok.get_vocab().items()
                  if i not in special and TAG_PIECE.search(t) and not CONTROL.match(t))


def guard_logits(logits: torch.Tensor, rows: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """logits: [B, V]; rows: [B] bool, the rows whose profile guards and whose edit is on -> logits with
    the banned token ids at -inf on those rows (in place)."""
    if rows.any():
        idx = rows.nonzero().squeeze(-1).to(logits.device)
        logits[idx[:, None], banned.to(logits.device)[None, :]] = float("-inf")
    return logits
