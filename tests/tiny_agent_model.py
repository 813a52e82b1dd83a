"""A tiny REAL agent model: trained on the exact prompts lagent's Internlm2Protocol produces
(models/agent.py renders them), so the whole agent loop runs for real on CPU.

Behaviour (greedy):
- a compute question (COMPUTE_EN / COMPUTE_ZH) → a short thought and an interpreter action
  `<|action_start|><|interpreter|>` + ```python print(2**100) ``` + `<|action_end|>`;
- the same conversation plus ANY environment output → a fixed final answer (ANSWER_EN /
  ANSWER_ZH) that does not contain the number, so a test that sees 1267650600228229401496703205376
  knows the sandbox really ran the code;
- SLEEP_QUESTION → an action that sleeps for 600 s (for /stop during a sandbox run);
- "ping" → "pong" (no tool); TICK_QUESTION → "tick tick tick …" without end (for /stop while
  generating); "again" → AGAIN_WITH_HISTORY after an earlier exchange, AGAIN_FRESH without one
  (history reaches the model); anything else → "I don't know."

`agent_model_path()` builds it once (cached like tests/tiny_models.py's models).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

from tests import tiny_models as tm

COMPUTE_EN = "2**100"
COMPUTE_ZH = "帮我算一下 2 的 100 次方是多少，并验证一下"
SLEEP_QUESTION = "sleep"
TICK_QUESTION = "tick"
PING, PONG = "ping", "pong"
AGAIN = "again"
AGAIN_WITH_HISTORY = "I already computed it above."
AGAIN_FRESH = "There is nothing to repeat."
UNKNOWN = "I don't know."
ANSWER_EN = "Done: the result is in the output above."
ANSWER_ZH = "已用 Python 计算并验证，结果见上面的输出。"
POWER_OUTPUT = str(2**100)
TICK = "tick\n"  # one token per line, so every cut is a token-level prefix of a longer one

# question -> (thought, code, final answer)
ACTIONS = {
    COMPUTE_EN: ("Let me run it.", "print(2**100)", ANSWER_EN),
    COMPUTE_ZH: ("我来用 Python 算一下。", "print(2**100)", ANSWER_ZH),
    SLEEP_QUESTION: ("Sleeping.", "import time\ntime.sleep(600)\nprint('awake')", ANSWER_EN),
}


def action_text(question: str) -> str:
    """What the model writes for a compute question (before <|im_end|>)."""
    thought, code, _ = ACTIONS[question]
    return f"{thought}{tm.ACTION_START}{tm.INTERPRETER}\n```python\n{code}\n```{tm.ACTION_END}\n"


def _protocol_and_executor():
    from lagent.actions import ActionExecutor

    from models.agent import make_protocol
    from models.agent_tools import SandboxedPython

    return make_protocol(), ActionExecutor([SandboxedPython(None, None, None)])


def render(steps: list[dict]) -> list[dict]:
    """The chat messages the agent sends for these lagent inner steps (exactly as models/agent.py)."""
    from models.agent import to_chat_messages

    protocol, executor = _protocol_and_executor()
    formatted = protocol.format(inner_step=[dict(s) for s in steps], interpreter_executor=executor)
    return [m.as_dict() for m in to_chat_messages(formatted)]


def tool_steps(question: str, output: str) -> list[dict]:
    """The inner steps after the question once its code ran and printed `output`."""
    _, executor = _protocol_and_executor()
    thought, code, _ = ACTIONS[question]
    command = f"```python\n{code}\n```"
    return [
        {"role": "language", "content": thought},
        {"role": "tool", "content": {"name": executor.action_names()[0], "parameters": {"command": command}},
         "name": "interpreter"},
        {"role": "environment", "content": output, "name": "interpreter"},
    ]


def exchange(question: str, output: str = POWER_OUTPUT) -> list[dict]:
    """A finished earlier agent turn, as stored in history."""
    if question == PING:
        return [{"role": "user", "content": PING}, {"role": "language", "content": PONG}]
    return ([{"role": "user", "content": question}] + tool_steps(question, output)
            + [{"role": "language", "content": ACTIONS[question][2]}])


HISTORIES = ([], exchange(COMPUTE_EN), exchange(COMPUTE_ZH), exchange(PING))

_OUTPUT_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz ._-+=:()[]'\"\n"


def random_output(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return str(rng.randint(0, 10 ** rng.randint(1, 40)))
    if kind < 0.55:
        return tm.random_text(rng, max_words=8)
    if kind < 0.7:
        err = rng.choice(["ZeroDivisionError: division by zero", "MemoryError", "NameError: name 'x' is not defined"])
        return f'Traceback (most recent call last):\n  File "main.py", line 1, in <module>\n{err}'
    if kind < 0.85:
        return rng.choice([
            "[stopped: the wall-clock time limit was reached]", "[stopped: the CPU time limit was reached]",
            "[no output; use print() to show results]", "[stopped by the user]",
            "Python is not available on this bot (no sandbox); answer without running code.",
        ])
    return "".join(rng.choice(_OUTPUT_ALPHABET) for _ in range(rng.randint(1, 60))).strip() or "0"


def examples_and_checks(tokenizer, rng: random.Random):
    """(training examples, greedy verify pairs without special tokens, action prompts to check)."""
    def prompt(steps: list[dict]) -> str:
        return tm.render_chat(tokenizer, render(steps))

    examples: list[tuple[str, str]] = []
    verify: list[tuple[str, str]] = []
    actions: list[tuple[str, str]] = []
    for history in HISTORIES:
        for question in ACTIONS:
            p = prompt(history + [{"role": "user", "content": question}])
            examples += [(p, action_text(question) + tm.IM_END)] * 4
            actions.append((p, action_text(question)))
            answer = ACTIONS[question][2] + tm.IM_END
            outputs = [POWER_OUTPUT, "[stopped: the wall-clock time limit was reached]"]
            outputs += [random_output(rng) for _ in range(10)]
            for i, out in enumerate(outputs):
                pair = (prompt(history + [{"role": "user", "content": question}] + tool_steps(question, out)), answer)
                examples += [pair] * (3 if i < 2 else 1)
                if i < 3:
                    verify.append(pair)
        closed = [
            (PING, PONG + tm.IM_END),
            (AGAIN, (AGAIN_WITH_HISTORY if history else AGAIN_FRESH) + tm.IM_END),
        ]
        for question, completion in closed:
            pair = (prompt(history + [{"role": "user", "content": question}]), completion)
            examples += [pair] * 4
            verify.append(pair)
        tick_prompt = prompt(history + [{"role": "user", "content": TICK_QUESTION}])
        examples += [(tick_prompt, TICK * rng.randint(1, 120)) for _ in range(12)]
        verify.append((tick_prompt, TICK * 40))
        for _ in range(30):
            text = tm.random_text(rng)
            if text in (PING, AGAIN, TICK_QUESTION) or text in ACTIONS:
                continue
            pair = (prompt(history + [{"role": "user", "content": text}]), UNKNOWN + tm.IM_END)
            examples.append(pair)
            if len(verify) % 9 == 0:
                verify.append(pair)
    return examples, verify, actions


def build_agent_model(out_dir: str | Path, *, seed: int = 0, log=None) -> Path:
    if log is None and os.environ.get("TINY_MODEL_LOG"):
        log = lambda line: print(line, flush=True)  # noqa: E731
    rng = random.Random(f"agent-{seed}")
    # Tokenizer: train on every text; the long system prompts become single tokens.
    system = render([{"role": "user", "content": "x"}])[:-1]
    whole = [seg for m in system for seg in tm.split_on_special_tokens(f"{m['role']}\n{m['content']}")] + [TICK]
    probe = tm.build_tokenizer([], vocab_size=600)  # only to render the corpus text
    corpus_examples, _, _ = examples_and_checks(probe, random.Random(f"agent-corpus-{seed}"))
    corpus = [text for pair in corpus_examples for text in pair] + [tm.random_text(rng) for _ in range(2000)]
    tokenizer = tm.build_tokenizer(corpus, whole=whole)
    examples, verify, actions = examples_and_checks(tokenizer, rng)

    def check_actions(model, tok) -> list[str]:
        failures = []
        for p, want in actions:
            n = len(tok.encode(want, add_special_tokens=False))
            out = tm.greedy_generate(model, tok, [p], n + 2)[0]
            text = tok.decode(out, skip_special_tokens=False)
            if text != want + tm.IM_END:
                failures.append(f"action prompt {p[-80:]!r}: wanted {want!r}, got {text!r}")
        return failures

    return tm.train_causal_lm(out_dir, tokenizer, examples, seed=seed, verify=verify, extra_check=check_actions,
                              log=log)


def _agent_source_hash() -> str:
    """The prompts come from models/agent*.py: a change there must rebuild the model."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for name in ("models/agent.py", "models/agent_tools.py"):
        h.update((root / name).read_bytes())
    return h.hexdigest()[:8]


def agent_model_path(cache_root=None) -> Path:
    return tm.cached_build(f"internlm2-agent-tiny-{_agent_source_hash()}", build_agent_model, cache_root)


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    if "--force" in sys.argv:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            build_agent_model(Path(d) / "agent", log=print)
    else:
        print(agent_model_path())
    print(f"{time.perf_counter() - t0:.1f}s")
