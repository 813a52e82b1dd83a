"""A tiny REAL chat model that answers with text that is hard to render (issue 9, item 1).

Asked one of the keys of TRICKY (as the only user message, with or without InternLM2's system
prompt), it answers that exact text, greedily, token by token like any model: C++/Java generics,
HTML-looking text, `a < b > c`, character references, unbalanced Markdown, nested and unclosed
fences, links with parentheses, tables, LaTeX, Chinese and emoji. The Telegram test streams these
through the whole bot and checks the final messages keep every character.

    markup_model_path() -> Path    (built once, cached like tests/tiny_models.py's models)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests import tiny_models as tm

TRICKY: dict[str, str] = {
    "generics": "In C++ write std::vector<int> v; and std::map<std::string, int> m; in Java List<String> x = "
                "new ArrayList<>(); or `Map<K, V>` in code.",
    "html": "Use the <div> element, not <span>. Broken: <b>x</i> &bogus; then <br/> and <!-- a comment -->.",
    "compare": "If a < b > c and x<y then 3 <= 4 >= 2; arrows -> and <- and <=> too.",
    "entities": "Write &amp; for &, &lt; for <, &gt; for >; also &#39; and &nbsp; and AT&T.",
    "unbalanced": "A *star alone, an _underscore alone, a `backtick alone, and ** doubled stars.",
    "fences": "````markdown\n```python\nprint(\"inner\")\n```\n````\nThen:\n```js\nlet a = 1 < 2;\n",
    "links": "See [Foo (bar)](https://en.wikipedia.org/wiki/Foo_(bar)) and https://example.com/a_(b) too.",
    "table": "| name | value |\n|------|-------|\n| a<b | 1&2 |\n| 中文 | 😀 |",
    "latex": "Energy $E=mc^2$, then $$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$ and \\(\\alpha_1 + \\beta\\) "
             "and \\[\\sum_{i=1}^n x_i\\].",
    "chinese": "你好，世界！🎉 这是**重点**，👍🏽 家人 👨‍👩‍👧 一半是 ½。",
    "markdown": "**bold** and *italic* and ~~gone~~ and `x < y`\n\n> a quote\n\n1. one\n2. two\n\n"
                "[InternLM](https://internlm.intern-ai.org.cn)",
}


def _heads() -> list[list[dict]]:
    return [[], [{"role": "system", "content": tm.INTERNLM_SYSTEM_PROMPT}]]


def build_markup_model(out_dir, *, seed: int = 0, log=None) -> Path:
    pairs = [(head + [{"role": "user", "content": key}], answer) for key, answer in TRICKY.items() for head in _heads()]
    corpus = [tm.render_chat_text(m) for m, _ in pairs] + list(TRICKY.values())
    tokenizer = tm.build_tokenizer(corpus, whole=[f"system\n{tm.INTERNLM_SYSTEM_PROMPT}"], min_frequency=1)
    examples = [(tm.render_chat(tokenizer, m), answer + tm.IM_END) for m, answer in pairs]
    return tm.train_causal_lm(out_dir, tokenizer, examples * 8, verify=examples, seed=seed, steps=1500,
                              anneal_steps=200, patience=400, attempts=3, log=log)


def markup_model_path(cache_root=None) -> Path:
    return tm.cached_build("markup-chat-tiny", build_markup_model, cache_root)


if __name__ == "__main__":
    t0 = time.perf_counter()
    if "--force" in sys.argv:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            build_markup_model(Path(d) / "markup", log=print)
    else:
        print(markup_model_path())
    print(f"{time.perf_counter() - t0:.1f}s")
