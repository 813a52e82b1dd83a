"""Token-by-token decoding: the streamed text equals the whole text, for the fast tokenizer of
the tiny models and for slow sentencepiece tokenizers (including one that, like InternLM2's
remote `InternLM2Tokenizer`, puts a space before special tokens when decoding)."""

from __future__ import annotations

import io
import random

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizer

from models.decoding import IncrementalDecoder
from models.generation import first_stop
from tests import tiny_models

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>"]
AGENT_TEXT = "<|action_start|><|interpreter|>\nprint(1 + 1)<|action_end|>\n"
TEXTS = [
    AGENT_TEXT,
    "print(1 + 1)<|action_end|>",
    "Hello world, 你好！ ü ß 🙂 end.<|im_end|>",
    "line one\n  indented  twice\n<|action_start|> spaced after a special<|action_end|> and ( 1 + 1 ) .",
]


def stream(tokenizer, ids, skip_special=False, skip_ids=()) -> tuple[str, list[str]]:
    decoder = IncrementalDecoder(tokenizer, skip_special, set(skip_ids))
    deltas = [decoder.push([i]) for i in ids] + [decoder.flush()]
    return "".join(deltas), deltas


# -- the tiny models' fast byte-level BPE tokenizer ---------------------------------------------
@pytest.fixture(scope="module")
def fast(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


def test_fast_tokenizer_streams_exactly_the_whole_decode(fast):
    rng = random.Random(7)
    special = set(fast.all_special_ids)
    for text in TEXTS:
        ids = fast.encode(text, add_special_tokens=False)
        assert stream(fast, ids)[0] == fast.decode(ids) == text
        kept = [i for i in ids if i not in special]
        assert stream(fast, ids, skip_special=True)[0] == fast.decode(kept)
    for _ in range(200):  # random ids: split characters, specials anywhere
        ids = [rng.randrange(len(fast)) for _ in range(rng.randrange(1, 30))]
        whole = fast.decode(ids)
        text, deltas = stream(fast, ids)
        assert text == whole


def test_half_characters_are_held_back_until_complete(fast):
    ids = fast.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # byte-level pieces of one character
    text, deltas = stream(fast, ids)
    assert text == "🙂" and [d for d in deltas if d] == ["🙂"]


def test_end_of_turn_ids_are_never_shown(fast):
    eos = fast.convert_tokens_to_ids("<|im_end|>")
    ids = fast.encode("pong", add_special_tokens=False) + [eos]
    assert stream(fast, ids, skip_ids={eos})[0] == "pong"


# -- slow sentencepiece tokenizers ------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    corpus = [t for t in TEXTS for _ in range(20)] + ["print(x) and print(y) are code", "hello there world"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        user_defined_symbols=SPECIALS, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return str(path)


class InternLM2StyleTokenizer(PreTrainedTokenizer):
    """A slow sentencepiece tokenizer that decodes like InternLM2's remote code: special tokens
    are joined by the tokenizer itself, each preceded by a space."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}

    def __init__(self, vocab_file, **kwargs):
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    def get_vocab(self):
        vocab = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text):
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        out, pieces, previous_special = "", [], False
        for token in tokens:
            if token in self.all_special_tokens:
                if not previous_special:
                    out += " "
                out += self.sp.decode(pieces) + token
                pieces, previous_special = [], True
            else:
                pieces.append(token)
                previous_special = False
        return out + self.sp.decode(pieces)


@pytest.fixture(scope="module", params=["internlm2-style", "llama"])
def slow(request, sp_model):
    if request.param == "llama":
        tokenizer = LlamaTokenizer(sp_model, legacy=False, add_bos_token=False, add_prefix_space=False,
                                   additional_special_tokens=SPECIALS)
    else:
        tokenizer = InternLM2StyleTokenizer(sp_model, additional_special_tokens=SPECIALS)
    assert not tokenizer.is_fast
    return tokenizer


def test_slow_tokenizer_streams_the_text_it_encoded(slow):
    for text in TEXTS:
        ids = slow.encode(text, add_special_tokens=False)
        assert stream(slow, ids)[0] == text


def windowed_decode_of_the_old_backend(tokenizer, ids) -> str:
    """The decoder this project had before: a window decoded twice, special tokens included."""
    out, prefix_offset, read_offset = "", 0, 0
    for n in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[prefix_offset:read_offset])
        full = tokenizer.decode(ids[prefix_offset:n])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            out += full[len(prefix):]
            prefix_offset, read_offset = read_offset, n
    return out


def test_slow_tokenizer_bug_of_issue_13_is_gone(slow):
    ids = slow.encode("print(1 + 1)<|action_end|>", add_special_tokens=False)
    text, deltas = stream(slow, ids)
    assert text == "print(1 + 1)<|action_end|>"
    assert deltas[-2:] == ["<|action_end|>", ""]
    if isinstance(slow, InternLM2StyleTokenizer):  # what users saw (issue 13)
        assert windowed_decode_of_the_old_backend(slow, ids) == "print(1 + 1))<|action_end|>"


def test_slow_tokenizer_skips_special_tokens_when_asked(slow):
    ids = slow.encode(AGENT_TEXT, add_special_tokens=False)
    assert stream(slow, ids, skip_special=True)[0] == "\nprint(1 + 1)\n"


def test_first_stop_finds_the_earliest_stop_string():
    assert first_stop("one two three", ("three", "two")) == 4
    assert first_stop("one", ("", "x")) is None
