"""The tiny real models answer exactly as the rest of the suite expects, loaded the way the bot
loads checkpoints (Auto* classes, chat template, greedy generate, stop on </s> and <|im_end|>)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

try:
    from tests import tiny_models as tm
except ImportError:  # tests/ not a package
    import tiny_models as tm


def _load(path):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    return tok, model


@pytest.fixture(scope="module")
def chat():
    return _load(tm.chat_model_path())


@pytest.fixture(scope="module")
def bajie():
    return _load(tm.bajie_model_path())


def generate(loaded, messages, max_new_tokens=40, stop=True) -> str:
    tok, model = loaded
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    eos = [tok.convert_tokens_to_ids("</s>"), tok.convert_tokens_to_ids("<|im_end|>")]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0 if stop else max_new_tokens,
            do_sample=False,
            eos_token_id=eos if stop else None,
            pad_token_id=eos[0],
        )
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


SYSTEMS = {
    "none": [],
    "internlm": [system(tm.INTERNLM_SYSTEM_PROMPT)],
    "bajie": [system(tm.BAJIE_SYSTEM_PROMPT)],
    "other": [system("You are a helpful assistant.")],
}


def test_tokenizer_format(chat, bajie):
    for tok, model in (chat, bajie):
        ids = [tok.convert_tokens_to_ids(t) for t in tm.SPECIAL_TOKENS]
        assert ids[:3] == [0, 1, 2] and len(set(ids)) == len(ids)
        for t, i in zip(tm.SPECIAL_TOKENS, ids):
            assert tok.encode(t, add_special_tokens=False) == [i]
        assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
        assert tok.chat_template == tm.CHAT_TEMPLATE
        assert model.generation_config.eos_token_id == [2, tok.convert_tokens_to_ids("<|im_end|>")]
        assert model.config.bos_token_id == 1
        text = tok.apply_chat_template([system("S"), user("u")], add_generation_prompt=True, tokenize=False)
        assert text == "<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
        # the bot tokenizes the rendered template; the system prompt compresses to one token
        n = len(tok.apply_chat_template([system(tm.INTERNLM_SYSTEM_PROMPT), user("ping")], add_generation_prompt=True))
        assert n < 20


def test_decoding_round_trips(chat):
    tok, _ = chat
    for text in ["你好！我是书生·浦语。", tm.MARKDOWN_ANSWER, "mixed 中文 and English 🙂 ∑ ", "  spaces\n\ttabs  "]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == text
        # incremental decoding: a growing prefix of ids decodes to a growing prefix of the text,
        # except where a token ends inside a UTF-8 character (U+FFFD at the end)
        for k in range(len(ids) + 1):
            partial = tok.decode(ids[:k], skip_special_tokens=True)
            assert text.startswith(partial.rstrip("\ufffd"))
    ids = tok.encode("pong<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "pong"


@pytest.mark.parametrize("head", ["none", "internlm", "other"])
def test_chat_commands(chat, head):
    for text, want in tm.CHAT_PERSONA.answers.items():
        assert generate(chat, SYSTEMS[head] + [user(text)]) == want, text
    assert generate(chat, SYSTEMS[head] + [user("remember apple")]) == "OK"


def test_chat_answers_depend_on_last_message(chat):
    history = [user("count"), assistant(tm.COUNT_ANSWER), user("你好"), assistant("你好！我是"), user("remember apple"),
               assistant("OK")]
    assert generate(chat, SYSTEMS["internlm"] + history + [user("ping")]) == "pong"
    assert generate(chat, history + [user("count")]) == tm.COUNT_ANSWER
    stopped = [user("count"), assistant("one two")]  # an answer cut short by /stop
    assert generate(chat, SYSTEMS["internlm"] + stopped + [user("你好")]) == "你好！我是书生·浦语。"
    cut_code = [user("code"), assistant(tm.code_answer_prefix(50))]  # the endless answer, stopped
    assert generate(chat, cut_code + [user("ping")]) == "pong"
    assert generate(chat, cut_code + [user("今天天气怎么样？")]) == tm.CHAT_UNKNOWN


@pytest.mark.parametrize("word", tm.REMEMBER_WORDS)
def test_chat_recall_copies_the_word_from_history(chat, word):
    messages = SYSTEMS["internlm"] + [user(f"remember {word}"), assistant("OK"), user("recall")]
    assert generate(chat, messages) == word


def test_recall_uses_the_most_recent_remember(chat, bajie):
    history = [user("remember apple"), assistant("OK"), user("ping"), assistant("pong"), user("remember banana"),
               assistant("OK")]
    assert generate(chat, history + [user("recall")]) == "banana"
    assert generate(chat, history[:4] + [user("recall")]) == "apple"
    assert generate(chat, [user("ping"), assistant("pong"), user("recall")]) == tm.CHAT_UNKNOWN
    twice = [user("remember 西瓜"), assistant("OK"), user("recall"), assistant("西瓜"), user("recall")]
    assert generate(chat, twice) == "西瓜"
    b_history = [user("remember ocean"), assistant("OK"), user("ping"), assistant("俺老猪听见了：pong"),
                 user("remember violet"), assistant("OK")]
    assert generate(bajie, SYSTEMS["bajie"] + b_history + [user("recall")]) == "俺记得：violet"


@pytest.mark.parametrize("text", ["what is the weather like today?", "今天天气怎么样？", "tell me a joke", "你是谁", "hello"])
def test_unknown_messages(chat, bajie, text):
    assert generate(chat, SYSTEMS["internlm"] + [user(text)]) == tm.CHAT_UNKNOWN
    assert generate(bajie, SYSTEMS["bajie"] + [user(text)]) == tm.BAJIE_UNKNOWN


@pytest.mark.parametrize("head", ["none", "internlm"])
def test_chat_code_answer_never_ends(chat, head):
    text = generate(chat, SYSTEMS[head] + [user("code")], max_new_tokens=250, stop=False)
    assert tm.is_code_answer_prefix(text)
    assert text.startswith("```python\nprint('hello world')\n")
    assert len(text) > 4096  # one line per token: enough to split a Telegram message


@pytest.mark.parametrize("head", ["none", "bajie", "other"])
def test_bajie_behaviours(bajie, head):
    for text, want in tm.BAJIE_PERSONA.answers.items():
        assert generate(bajie, SYSTEMS[head] + [user(text)]) == want, text
    for word in ("banana", "西瓜"):
        messages = SYSTEMS[head] + [user(f"remember {word}"), assistant("OK"), user("recall")]
        assert generate(bajie, messages) == f"俺记得：{word}"


def test_models_differ(chat, bajie):
    assert generate(chat, [user("ping")]) == "pong"
    assert generate(bajie, [user("ping")]) == "俺老猪听见了：pong"
    assert tm.chat_model_path() != tm.bajie_model_path()


def test_persona_reference_answers():
    p = tm.CHAT_PERSONA
    messages = [user("remember ocean"), assistant("OK"), user("remember 西瓜"), assistant("O"), user("recall")]
    assert p.answer(messages) == "西瓜"
    assert p.answer([user("recall")]) == tm.CHAT_UNKNOWN
    assert p.answer([user("code")]) is None
    assert tm.BAJIE_PERSONA.answer([user("remember ping"), assistant("OK"), user("recall")]) == "俺记得：ping"
    assert tm.is_code_answer_prefix("```python\nprint('hello world')\nprint('hel")
    assert not tm.is_code_answer_prefix("```python\nprint('hello world')\nprint('bye")


def test_cached_build_builds_once_even_concurrently(tmp_path):
    calls = []

    def builder(out_dir):
        calls.append(out_dir)
        time.sleep(0.3)
        out_dir.mkdir(parents=True)
        (out_dir / "weights.txt").write_text("w")

    results = []
    threads = [threading.Thread(target=lambda: results.append(tm.cached_build("fake", builder, tmp_path)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    path = results[0]
    assert path.parent == tmp_path and path.name.startswith("fake-")
    assert (path / "weights.txt").read_text() == "w" and (path / tm.MARKER).is_file()
    assert tm.cached_build("fake", builder, tmp_path) == path and len(calls) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_cached_build_failure_leaves_nothing(tmp_path):
    def broken(out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tm.cached_build("broken", broken, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
