"""Streaming generated tokens: the streamer protocol and a streamer that prints text as it comes.

A streamer is a callable `f(tokens)` or an object with `put(tokens)` and `end()`. After every step it
receives the new token of each row as a CPU LongTensor [B]; if `put` (or the callable) returns True,
generation stops after that step; `end()` is called once after the last step.
"""

from collections.abc import Sequence

import torch


def stream(streamer, token: torch.Tensor) -> bool:
    """Hands `token` [B] to `streamer` (None: nothing); True when it asks to stop."""
    if streamer is None:
        return False
    put = streamer.put if hasattr(streamer, "put") else streamer
    return bool(put(token.cpu()))


def end_stream(streamer) -> None:
    """Tells `streamer` (if it has `end()`) that generation is over."""
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()


class TextStreamer:
    """A streamer for one row that turns tokens into text as they arrive.

    Decodes a short window of recent ids and emits only the new suffix, holding back text that ends
    in an incomplete UTF-8 character (byte-level BPE splits characters across tokens) or that could
    be the start of a stop string. Generation stops at the first stop string, which is not emitted.
    """

    def __init__(self, tokenizer, *, stop: Sequence[str] = (), out=None):
        self.tokenizer, self.stop, self.out = tokenizer, [s for s in stop if s], out
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] give context; ids[read:] are not yet emitted
        self.text = ""  # emitted text
        self.pending = ""  # decoded but held back (a possible stop-string start)
        self.stopped = False

    def put(self, tokens: torch.Tensor) -> bool:
        if self.stopped:
            return True
        self.ids.append(int(tokens.reshape(-1)[0]))
        seen = self.tokenizer.decode(self.ids[self.prefix:self.read])
        new = self.tokenizer.decode(self.ids[self.prefix:])
        if len(new) <= len(seen) or new.endswith("\ufffd"):
            return False  # an incomplete character: wait for the next token
        self.pending += new[len(seen):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._flush(final=False)

    def end(self) -> None:
        if not self.stopped:
            self._flush(final=True)
        if self.out is not None:
            self.out.write("\n")
            self.out.flush()

    def _flush(self, final: bool) -> bool:
        # Emitted text never ends in a possible stop-string start (it is held back), so a stop
        # string can only begin inside `pending`.
        hits = [self.pending.find(s) for s in self.stop if s in self.pending]
        if hits:
            cut, self.stopped = min(hits), True
        elif final:
            cut = len(self.pending)
        else:  # hold back the longest tail that is a prefix of a stop string
            tail = max((n for s in self.stop for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
            cut = len(self.pending) - tail
        self._emit(self.pending[:cut])
        self.pending = self.pending[cut:]
        return self.stopped

    def _emit(self, text: str) -> None:
        self.text += text
        if self.out is not None and text:
            self.out.write(text)
            self.out.flush()
