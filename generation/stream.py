"""Text of a growing token sequence, piece by piece, for printing tokens as they are produced.

Pieces do not map to text one by one: sentencepiece spells a space as U+2581 and drops it at the start, byte-level
BPE splits characters over tokens, byte fallback splits UTF-8 sequences. So the new text is the decoded whole
minus what was already printed, held back while it ends in an incomplete character (U+FFFD).
"""

from data.tokenizer import Tokenizer


class TextStream:
  def __init__(self, tokenizer: Tokenizer) -> None:
    self._tokenizer = tokenizer
    self._ids: list[int] = []
    self._printed = ""

  def push(self, token_id: int) -> str:
    """Adds one token; returns the text it completes ("" while a character is still incomplete)."""
    self._ids.append(int(token_id))
    text = self._tokenizer.decode(self._ids)
    if text.endswith("\ufffd") or not text.startswith(self._printed):
      return ""
    new, self._printed = text[len(self._printed) :], text
    return new

  def flush(self) -> str:
    """Whatever is left (an incomplete character at the very end decodes as U+FFFD)."""
    text = self._tokenizer.decode(self._ids)
    new = text[len(self._printed) :] if text.startswith(self._printed) else ""
    self._printed = text
    return new
