"""One-shot GPU check: which part of the bot path costs the 3x on the GPU host, and which fix works.
(From ../shared/tools/gpu_check.py; adapted to the batching engine: the bot's model now generates
in its own process, so the raw variants use a copy loaded in this process.)

Run from the project root (needs the project's deps, as bench/streaming.py does):
    python bench/gpu_check.py --device cuda --dtype bfloat16 --tokens 100 --repeats 3 [--compile]
CPU dry run:  python bench/gpu_check.py --device cpu --dtype float32 --hidden 64 --layers 24 --heads 4 --kv-heads 2

Variants (same model object, same prompt ids, greedy, fixed token count; rounds alternate):
  raw_main         generate() on the main thread, streamer does nothing            (bench "raw")
  worker_join      same call on a worker thread; main blocked in join()           -> thread/CUDA per se
  worker_loop_idle worker + asyncio loop idle in epoll, woken once at the end      -> an idle loop thread
  wake_each        worker + loop woken per token (call_soon_threadsafe no-op)     -> one hand-off per token
  wake_50ms        worker + loop woken at most every 50 ms                         -> hand-offs coalesced
  wake_handshake   per-token wake, worker then blocks <=5 ms until the loop ran     -> GIL handed over, not raced for
  sft              the project's stream_from_thread (decode in worker + mailbox; still used by vision)
  sft_50ms         stream_from_thread with the mailbox waking the loop at most every 50 ms
  sft_sw1ms        stream_from_thread with sys.setswitchinterval(0.001) (the old code set it; now dropped)
  bot              App + console adapter, output discarded, model in its generation process (the default)
  bot_thread       the same with GENERATION_HOST=thread (batching engine on a thread of this process)
  subprocess       generate() in a child process, token ids streamed over a pipe to this loop
  [--compile] raw_static / worker_static: cache_implementation="static" (4.48 auto-compiles
              with mode="reduce-overhead" on CUDA) on the main thread and on a worker thread
Per variant: ms/token (wall, incl. prefill like the bench), ratio to raw_main, worker CPU ms/token
(thread_time; CPU ~= wall means the worker is busy, CPU << wall means it waits), inter-token gap
p50/p90/max as the generating thread sees them, and loop wake-up latency p50/p90.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(os.environ.get("PROJECT_ROOT", Path.cwd())).resolve()  # run from the project root
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


class Streamer:
    """Records the time of each new token on the generating thread; optional per-token hook."""

    def __init__(self, hook=None):
        self.seen = False
        self.times: list[float] = []
        self.hook = hook

    def put(self, value):
        if not self.seen:
            self.seen = True
            return
        self.times.append(time.perf_counter())
        if self.hook:
            self.hook(value)

    def end(self):
        pass


def gen_kwargs(model, ids, eos, tokens, **extra):
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                eos_token_id=eos, pad_token_id=eos[0], temperature=None, top_p=None, top_k=None, **extra)


def _vcs() -> float:
    """Voluntary context switches of the calling thread (a GIL waiter that keeps losing the race
    shows hundreds per token; natively it is ~1-2)."""
    try:
        return float(resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw)
    except (AttributeError, OSError):
        return float("nan")


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Run:
    def __init__(self):
        self.elapsed = 0.0
        self.worker_cpu = float("nan")
        self.gaps: list[float] = []
        self.lat: list[float] = []
        self.tokens = 0
        self.worker_vcs = float("nan")
        self.main_vcs = float("nan")


def _generate_on_this_thread(model, ids, eos, tokens, run, hook=None, **extra):
    s = Streamer(hook)
    c0 = time.thread_time()
    v0 = _vcs()
    with torch.inference_mode():
        out = model.generate(**gen_kwargs(model, ids, eos, tokens, **extra), streamer=s)
    run.worker_cpu = time.thread_time() - c0
    run.worker_vcs = _vcs() - v0
    run.tokens = out.shape[1] - ids.shape[1]
    run.gaps = [b - a for a, b in zip(s.times, s.times[1:])]


def v_raw_main(ctx, run, **extra):
    t = time.perf_counter()
    _generate_on_this_thread(ctx.model, ctx.ids, ctx.eos, ctx.tokens, run, **extra)
    run.elapsed = time.perf_counter() - t


def v_worker_join(ctx, run, **extra):
    t = time.perf_counter()
    th = threading.Thread(target=_generate_on_this_thread, args=(ctx.model, ctx.ids, ctx.eos, ctx.tokens, run), kwargs=extra)
    th.start()
    th.join()
    run.elapsed = time.perf_counter() - t


def _with_loop(ctx, run, wake_every_s=None, handshake=False, **extra):
    """worker generates; the loop is woken never (None), per token (0) or at most every N s.
    handshake: after waking the loop the worker blocks (GIL released) until the loop has run
    the callback (at most 5 ms), so the loop gets the GIL at once instead of racing for it."""
    async def go():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        last = [0.0]
        ran = threading.Event()

        def cb(t_put):
            run.lat.append(time.perf_counter() - t_put)
            ran.set()

        def hook(value):
            if wake_every_s is None:
                return
            now = time.perf_counter()
            if now - last[0] >= wake_every_s:
                last[0] = now
                ran.clear()
                loop.call_soon_threadsafe(cb, now)
                if handshake:
                    ran.wait(0.005)

        def work():
            try:
                _generate_on_this_thread(ctx.model, ctx.ids, ctx.eos, ctx.tokens, run, hook, **extra)
            finally:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        t = time.perf_counter()
        threading.Thread(target=work).start()
        await done
        run.elapsed = time.perf_counter() - t
    asyncio.run(go())


def v_worker_loop_idle(ctx, run):
    _with_loop(ctx, run, None)


def v_wake_each(ctx, run):
    _with_loop(ctx, run, 0.0)


def v_wake_50ms(ctx, run):
    _with_loop(ctx, run, 0.05)


def v_wake_handshake(ctx, run):
    _with_loop(ctx, run, 0.0, handshake=True)


def _sft(ctx, run, coalesce_s=None, switch=None):
    from models import thread_stream as tb
    from models.base import Cancel, GenerationParams
    from models.generation import sampling_kwargs

    old_put, old_switch = tb._Mailbox.put, sys.getswitchinterval()
    if coalesce_s is not None:
        def put(self, item):  # wake the loop at most every coalesce_s (always for the end marker)
            now = time.perf_counter()
            with self.lock:
                self.items.append(item)
                wake = not getattr(self, "_pending", False) and (
                    now - getattr(self, "_last", 0.0) >= coalesce_s or not isinstance(item, str))
                if wake:
                    self._pending, self._last = True, now
            if wake:
                def fire():
                    self._pending = False
                    self.ready.set()
                self.loop.call_soon_threadsafe(fire)
        tb._Mailbox.put = put
    if switch is not None:
        sys.setswitchinterval(switch)

    async def go():
        params = GenerationParams(max_new_tokens=ctx.tokens, temperature=0.0)
        kwargs = dict(input_ids=ctx.ids, attention_mask=torch.ones_like(ctx.ids), eos_token_id=ctx.eos,
                      pad_token_id=ctx.eos[0], **sampling_kwargs(params))

        def generate(bridge):
            streamer = bridge["streamer"]
            orig = streamer.put
            times = []

            def put(value):
                if streamer.prompt_seen:
                    times.append(time.perf_counter())
                orig(value)
            streamer.put = put
            c0 = time.thread_time()
            out = ctx.model.generate(**kwargs, **bridge)
            run.worker_cpu = time.thread_time() - c0
            run.tokens = out.shape[1] - ctx.ids.shape[1]
            run.gaps = [b - a for a, b in zip(times, times[1:])]

        t = time.perf_counter()
        async for _ in tb.stream_from_thread(generate, tokenizer=ctx.tokenizer, eos_ids=ctx.eos, params=params,
                                             cancel=Cancel(), stats=None, prompt_tokens=int(ctx.ids.shape[1]), name="check"):
            pass
        run.elapsed = time.perf_counter() - t
    try:
        asyncio.run(go())
    finally:
        tb._Mailbox.put = old_put
        sys.setswitchinterval(old_switch)


def v_sft(ctx, run):
    _sft(ctx, run)


def v_sft_50ms(ctx, run):
    _sft(ctx, run, coalesce_s=0.05)


def v_sft_sw1ms(ctx, run):
    _sft(ctx, run, switch=0.001)


def _bot(app, run):
    import streaming as bench  # bench/streaming.py

    app.loop.run_until_complete(bench.bot_run(app, "/reset"))
    tps, first, produced = app.loop.run_until_complete(bench.bot_run(app, "code"))
    run.elapsed, run.tokens = produced / tps, produced


def v_bot(ctx, run):
    _bot(ctx.apps["process"], run)


def v_bot_thread(ctx, run):
    _bot(ctx.apps["thread"], run)


def v_subprocess(ctx, run):
    """The child was started once (model loaded there); each run asks it for one generation."""
    child = ctx.child

    async def go():
        loop = asyncio.get_running_loop()
        r, _ = child
        got, buf = [], b""
        child_stdin = ctx.child_proc.stdin
        t = time.perf_counter()
        child_stdin.write(b"go\n")
        child_stdin.flush()
        fut = loop.create_future()

        def readable():
            nonlocal buf
            data = os.read(r, 65536)
            buf += data
            while len(buf) >= 8:
                (tok, sent), buf = struct.unpack("<iI", buf[:8]), buf[8:]
                if tok < 0:
                    fut.done() or fut.set_result(sent)
                    return
                got.append(time.perf_counter())
        loop.add_reader(r, readable)
        try:
            await fut
        finally:
            loop.remove_reader(r)
        run.elapsed = time.perf_counter() - t
        run.tokens = len(got)
        run.gaps = [b - a for a, b in zip(got, got[1:])]
    asyncio.run(go())


def v_raw_static(ctx, run):
    v_raw_main(ctx, run, cache_implementation="static")


def v_worker_static(ctx, run):
    v_worker_join(ctx, run, cache_implementation="static")


VARIANTS = dict(raw_main=v_raw_main, worker_join=v_worker_join, worker_loop_idle=v_worker_loop_idle,
                wake_each=v_wake_each, wake_50ms=v_wake_50ms, wake_handshake=v_wake_handshake, sft=v_sft, sft_50ms=v_sft_50ms, sft_sw1ms=v_sft_sw1ms,
                bot=v_bot, bot_thread=v_bot_thread, subprocess=v_subprocess, raw_static=v_raw_static, worker_static=v_worker_static)


def child_main(path: str, device: str, dtype: str, tokens: int, fd: int) -> None:
    """Child process: load, warm up, then one generation per 'go' line; 8-byte records on fd."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.tensor([json.loads(sys.stdin.readline())], device=device)
    eos = json.loads(sys.stdin.readline())

    def hook(value):
        for t in value.reshape(-1).tolist():
            os.write(fd, struct.pack("<iI", int(t), 0))

    run = Run()
    _generate_on_this_thread(model, ids, eos, 8, run)  # warm-up
    os.write(fd, struct.pack("<iI", -2, 0))
    for line in sys.stdin:
        if line.strip() != "go":
            break
        _generate_on_this_thread(model, ids, eos, tokens, run, hook)
        os.write(fd, struct.pack("<iI", -1, run.tokens))


def environment(device: str) -> dict:
    env = dict(python=sys.version.split()[0], torch=torch.__version__, platform=platform.platform(),
               cpu_count=os.cpu_count(), affinity=len(os.sched_getaffinity(0)), switchinterval=sys.getswitchinterval())
    for f in ("/sys/fs/cgroup/cpu.max", "/proc/version"):
        try:
            env[f] = Path(f).read_text().strip()[:120]
        except OSError:
            pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    import transformers
    env["transformers"] = transformers.__version__
    return env


def pct(xs, q):
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--variants", default="raw_main,worker_join,worker_loop_idle,wake_each,wake_50ms,wake_handshake,sft,sft_50ms,sft_sw1ms,bot,bot_thread,subprocess")
    ap.add_argument("--compile", action="store_true", help="also raw_static and worker_static (slow first call)")
    ap.add_argument("--child", nargs=4, metavar=("PATH", "DTYPE", "TOKENS", "FD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.child:
        return child_main(args.child[0], args.device, args.child[1], int(args.child[2]), int(args.child[3]))
    names = args.variants.split(",") + (["raw_static", "worker_static"] if args.compile else [])

    import streaming as bench  # bench/streaming.py
    from bot.app import App
    from bot.config import Settings

    class Ctx:
        pass
    ctx = Ctx()
    ctx.tokens = args.tokens
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = bench.bench_tokenizer(Path(tmp) / "tok")
        path, params = bench.random_model(tok_dir, Path(tmp) / "m", hidden=args.hidden, layers=args.layers,
                                          heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate)
        ctx.apps = {}
        for host in ("process", "thread") if any(n.startswith("bot") for n in names) else ("thread",):
            settings = Settings(_env_file=None, chat_model=str(path), data_dir=Path(tmp) / f"d-{host}", device=args.device,
                                dtype=args.dtype, temperature=0.0, max_new_tokens=args.tokens, max_context_tokens=4096,
                                rate_limit_messages=100000, generation_host=host)
            app = ctx.apps[host] = App(settings)
            app.loop = asyncio.new_event_loop()
            for text in ("/reset", "ping", "/reset", "code"):
                app.loop.run_until_complete(bench.bot_run(app, text))
        app = ctx.apps.get("process") or ctx.apps["thread"]
        backend = app.hub.get("chat").backend
        ctx.tokenizer, ctx.eos = backend.tokenizer, backend.eos_ids
        # raw variants: this process's own copy (the process host's model lives in its worker)
        ctx.model = ctx.apps["thread"].hub.get("chat").backend.model if "thread" in ctx.apps else None
        ctx.ids = torch.tensor([backend.encode(app.hub.get("chat").last_prompt)], device=backend.device)
        if "subprocess" in names:
            r, w = os.pipe()
            ctx.child_proc = subprocess.Popen(
                [sys.executable, __file__, "--device", args.device, "--child", str(path), args.dtype, str(args.tokens), str(w)],
                stdin=subprocess.PIPE, pass_fds=(w,))
            os.close(w)
            ctx.child = (r, None)
            ctx.child_proc.stdin.write((json.dumps(ctx.ids[0].tolist()) + "\n" + json.dumps(ctx.eos) + "\n").encode())
            ctx.child_proc.stdin.flush()
            assert struct.unpack("<iI", os.read(r, 8))[0] == -2, "child failed to start"
        print(f"setup {time.perf_counter() - started:.0f}s; {json.dumps(environment(args.device))}", flush=True)
        results: dict[str, list[Run]] = {n: [] for n in names}
        for rep in range(args.repeats + 1):  # round 0 warms up every variant (compiles, graphs)
            for n in names:
                run = Run()
                t0 = time.perf_counter()
                mv0 = _vcs()
                try:
                    VARIANTS[n](ctx, run)
                    run.main_vcs = _vcs() - mv0
                except Exception as exc:  # one failing variant must not cost the whole GPU run
                    print(f"{n}: failed: {exc!r}"[:300], flush=True)
                    continue
                _sync(args.device)
                if rep:
                    results[n].append(run)
                elif time.perf_counter() - t0 > 30:
                    print(f"{n}: warm-up took {time.perf_counter() - t0:.0f}s", flush=True)
        if "subprocess" in names:
            ctx.child_proc.stdin.close()
            ctx.child_proc.wait(timeout=30)
        for app in ctx.apps.values():
            app.hub.close()
            app.loop.close()
            app.store.close()
    base = statistics.median(r.elapsed / max(r.tokens, 1) for r in results[names[0]]) if results[names[0]] else float("nan")
    print(f"{params / 1e6:.0f}M params, {args.tokens} tokens, median of {args.repeats}")
    print(f"{'variant':<17}{'ms/tok':>8}{'ratio':>7}{'wrk cpu ms/tok':>15}{'gap p50':>9}{'p90':>7}{'max':>7}{'wake p50':>9}{'p90':>7}{'main vcs/tok':>13}{'wrk vcs/tok':>12}")
    for n in names:
        rs = results[n]
        if not rs:
            print(f"{n:<17} (no result)")
            continue
        mid = sorted(rs, key=lambda r: r.elapsed / max(r.tokens, 1))[len(rs) // 2]
        ms = 1e3 * mid.elapsed / max(mid.tokens, 1)
        cpu = 1e3 * mid.worker_cpu / max(mid.tokens, 1)
        g = [1e3 * x for x in mid.gaps]
        lat = [1e3 * x for x in mid.lat]
        print(f"{n:<17}{ms:8.2f}{1e3 * base / ms if ms else 0:7.3f}{cpu:15.2f}{pct(g, .5):9.2f}{pct(g, .9):7.2f}{max(g) if g else float('nan'):7.2f}"
              f"{pct(lat, .5):9.3f}{pct(lat, .9):7.3f}{mid.main_vcs / max(mid.tokens, 1):13.2f}{mid.worker_vcs / max(mid.tokens, 1):12.2f}")


if __name__ == "__main__":
    main()
