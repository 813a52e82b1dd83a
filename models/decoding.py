"""Token ids → text deltas, one token at a time, for fast and slow (sentencepiece) tokenizers.

Decoding the whole answer again at every token is O(n²); decoding each token alone breaks
multi-byte characters and loses the spaces sentencepiece marks on the *next* piece. The usual
fix (as in TGI and vLLM) decodes a short window twice: the already-shown tokens, and the same
tokens plus the new ones, and emits the difference.

That difference is only right when decoding a prefix of the ids gives a prefix of the text.
Slow tokenizers break this around special tokens: `PreTrainedTokenizer` joins special tokens
with spaces, and InternLM2's remote `convert_tokens_to_string` puts a space before each special
token (so `print(1 + 1)<|action_end|>` came out as `print(1 + 1))<|action_end|>`). So special
and added tokens never enter a decode here: they are written verbatim (or skipped), and the
window restarts after each one, primed with an ordinary token so that a sentencepiece word
boundary right after a special token keeps its space, as a whole-text decode keeps it.
"""

from __future__ import annotations

_DECODE_OPTIONS = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)


class IncrementalDecoder:
    """`push(ids)` returns the new text; `flush()` the held-back rest at the end."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, skip_ids: set[int] | frozenset[int] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.skip_ids = set(skip_ids)
        self.special_ids = special_token_ids(tokenizer)
        self.all_special = set(getattr(tokenizer, "all_special_ids", ()))
        self.prime = _prime_id(tokenizer, self.special_ids)
        self.window: list[int] = []  # ordinary tokens since the last special token
        self.prefix_offset = 0
        self.read_offset = 0
        self.primed = False

    def push(self, token_ids: list[int]) -> str:
        out = []
        for token in token_ids:
            if token in self.skip_ids:
                continue
            if token in self.special_ids:
                out.append(self._end_run())
                if not (self.skip_special and token in self.all_special):
                    out.append(self.tokenizer.convert_ids_to_tokens(token))
                self._start_run(primed=True)
            else:
                self.window.append(token)
        out.append(self._advance())
        return "".join(out)

    def flush(self) -> str:
        return self._end_run()

    # -- one run of ordinary tokens ----------------------------------------------------------
    def _start_run(self, primed: bool) -> None:
        self.primed = primed and self.prime is not None
        self.window = [self.prime] if self.primed else []
        self.prefix_offset = 0
        self.read_offset = len(self.window)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **_DECODE_OPTIONS) if ids else ""

    def _advance(self, final: bool = False) -> str:
        if self.read_offset >= len(self.window):
            return ""
        shown = self._decode(self.window[self.prefix_offset : self.read_offset])
        text = self._decode(self.window[self.prefix_offset :])
        if not final and (text.endswith("\ufffd") or len(text) <= len(shown)):
            return ""  # half a character (or nothing new yet): wait for the next token
        if not text.startswith(shown):  # a decoder that rewrites earlier text (clean-up rules):
            shown = _common_prefix(shown, text)  # keep what was shown, never lose the new text
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.window)
        return text[len(shown) :]

    def _end_run(self) -> str:
        return self._advance(final=True)


def special_token_ids(tokenizer) -> set[int]:
    """Ids that a slow tokenizer treats specially on decode: special tokens and added tokens."""
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i in added)
    return ids


def _prime_id(tokenizer, special: set[int]) -> int | None:
    for text in ("a", "x", "0"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in special:
            return ids[0]
    return None


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]
