"""End-to-end tokens/s: what users run against the engine under it, one model, one prompt set, one run.

Every path generates for the same `--problems` questions with self-consistency n=`--n` sampling
(temperature 0.6, top_p 0.95, detokenised, EOS honoured, `--max-tokens` per branch) at the same
concurrency (all problems at once: problems x n live branches):

  engine     the raw engine in a bare `step()` loop, same sampling as users (no asyncio, no strategy)
  bare       the old engine benchmark's loop: top_p=1, no detokenisation, EOS ignored (reference only)
  pipeline   `Pipeline(EngineBackend, "self-consistency:n=N", concurrency=problems)` in this process
  eval       `ttscale eval --backend engine:MODEL` as a subprocess (self-consistency with another seed first
             as warm-up; the second run's rate from the store's timestamps; `cold` is the whole process)
  eval-inprocess  `evaluate()`, what `ttscale eval` runs, in this process on the same warm engine: the eval
             layer's own cost (claims, grading, a stored row per problem) without process start and load
  serve      `ttscale serve --backend engine:MODEL` + the `openai` client, `model=self-consistency-N/e2e`
  generate   transformers `generate(num_return_sequences=n)` over left-padded prompt batches

    python benchmarks/e2e_throughput.py --device cuda --model smollm2
    python benchmarks/e2e_throughput.py --device cuda --model random:qwen2.5-0.5b
    python benchmarks/e2e_throughput.py --device cpu --model random:tiny --problems 8 --n 4 --max-tokens 32
    python benchmarks/e2e_throughput.py --device cpu --model random:tiny --host-only --paths engine,pipeline
    python benchmarks/e2e_throughput.py --device cuda --model random:smollm2 --repeat 3   # medians of 3 runs
    python benchmarks/e2e_throughput.py --device cpu --model random:tiny --host-only \
        --paths engine,pipeline,eval-inprocess --problems 64 --n 8 --max-tokens 128 --threads 1

`--host-only` replaces the model's forward and the sampler with near-free stand-ins (tokens drawn from a
fixed English text by seed and step, never EOS) in this process, so what is measured is the host work
alone: scheduling, metadata, detokenisation, hand-offs, the Context and the strategy. That is what
dominates on a GPU, where the forward is fast; on a CPU the real forward hides it.

`--model`: `smollm2` / `default` (the bundled SmolLM2-135M-Instruct), `random:qwen2.5-0.5b`,
`random:smollm2`, `random:tiny` (random weights from a transformers config, saved once to a temp folder
with SmolLM2's tokenizer; they never emit EOS, so every branch makes `--max-tokens`), or a local model
folder / .gguf. Tokens/s = generated tokens (prompt excluded) / wall time of the measured run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "qwen2.5-0.5b": ("qwen2", {
        "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "use_sliding_window": False}),
    "smollm2": ("llama", {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5}),
    "tiny": ("llama", {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 49152, "tie_word_embeddings": True,
        "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def log(*a) -> None:
    print(*a, flush=True)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def resolve_model(spec: str, dtype, tokenizer_dir: str | None, work: Path) -> tuple[str, str]:
    """(folder, label) for `--model`; random shapes are built and saved under `work`."""
    if spec in ("smollm2", "default"):
        from ttscale.models import default_model_dir

        return str(default_model_dir()), "SmolLM2-135M-Instruct"
    if spec.startswith("random:"):
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

        shape = spec.removeprefix("random:")
        if shape not in SHAPES:
            raise SystemExit(f"--model random:SHAPE with SHAPE one of {', '.join(SHAPES)} (got {shape!r})")
        arch, kw = SHAPES[shape]
        cfg = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**kw, eos_token_id=None, bos_token_id=None)
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        hf.generation_config.eos_token_id = None
        folder = work / f"random-{shape}"
        hf.save_pretrained(folder)
        if tokenizer_dir is None:
            from ttscale.models import default_model_dir

            tokenizer_dir = str(default_model_dir())
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copy(Path(tokenizer_dir) / f, folder / f)
        return str(folder), f"random {shape} shape"
    from ttscale.backends.engine.loader import resolve_model_path

    p = resolve_model_path(spec)
    return str(p), p.name


def make_problems(k: int) -> list[dict]:
    """`k` arithmetic word problems (deterministic), in the dataset schema."""
    out = []
    for i in range(k):
        a, b, c = 12 + 7 * i % 89, 3 + 5 * i % 17, 100 + 13 * i % 400
        out.append({"id": f"e2e-{i}", "answer": str(a * b + c), "kind": "math",
                    "prompt": f"A shop sells {b} boxes with {a} pens each and has {c} loose pens. "
                              f"How many pens does it have in total?"})
    return out


# ---- in-process paths ----------------------------------------------------------------------------------
HOST_ONLY_TEXT = ("To find the total, first multiply the number of boxes by the pens in each box, then add the "
                  "loose pens. So the shop has that many pens in all, which is the answer we wanted to check. ")


def make_host_only(eng, tok, device_ms: float = 0.0) -> None:
    """Swap `eng`'s forward and sampler for near-free stand-ins (see `--host-only`). `device_ms`: each step
    also takes this long on a simulated device, queued behind the step before it, and reading its tokens
    waits for it with the GIL released (as a CUDA event's wait does), so the host work overlaps it."""
    import torch

    import ttscale.backends.engine.model_runner as engine_mod  # where the engine samples

    pool = torch.tensor(tok.encode(HOST_ONLY_TEXT * 4, add_special_tokens=False), dtype=torch.long)
    ready_at: dict[int, float] = {}  # id of a step's token tensor -> when the simulated device finishes it
    queue_end = 0.0  # when the simulated device finishes the last step queued on it

    def forward_meta(cache, meta, return_hidden=False, float_logits=True):
        return torch.zeros(meta.logits_idx.shape[0], 1)

    def sample(logits, st, filtered, n_top):
        nonlocal queue_end
        toks = pool[(st.seeds % len(pool) + st.steps) % len(pool)]
        if device_ms:
            queue_end = max(time.perf_counter(), queue_end) + device_ms / 1e3
            ready_at[id(toks)] = queue_end
        lps = torch.zeros(toks.shape[0])
        if n_top:
            return toks, lps, toks[:, None].expand(-1, n_top), torch.zeros(toks.shape[0], n_top)
        return toks, lps, None, None

    eng.model.forward_meta = forward_meta
    engine_mod.sample = sample
    if device_ms:
        lists = engine_mod.Launched.lists

        def lists_when_done(self):
            wait = ready_at.pop(id(self.tok), 0.0) - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            return lists(self)

        engine_mod.Launched.lists = lists_when_done


def prompt_ids(tok, strategy, problems) -> list[list[int]]:
    from ttscale.types import Problem

    ids = []
    for p in problems:
        msgs = strategy.messages(Problem(**p))
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids.append(tok.encode(text, add_special_tokens=False))
    return ids


def run_engine(eng, prompts: list[list[int]], n: int, params, device: str) -> dict:
    """All prompts x n requests in a bare step loop (the engine's own speed for this workload)."""
    eng.prefix.clear()
    flat, ps = [], []
    for j, p in enumerate(prompts):
        for k in range(n):
            flat.append(p)
            ps.append(params.model_copy(update={"seed": 1000 * j + k}))
    from ttscale.backends.engine.backend import EngineConfig
    from ttscale.backends.engine.quiet_gc import QuietGC

    c0 = eng.graphs.captures if eng.graphs else 0
    s0 = dict(eng.stats)
    sync(device)
    QuietGC.enter(EngineConfig().gc_gen0 or 700)  # the collector as a backend's engine thread runs with it
    try:
        t0 = time.perf_counter()
        reqs = eng.generate(flat, ps)
        sync(device)
        wall = time.perf_counter() - t0
    finally:
        QuietGC.exit()
    toks = sum(len(r.output_ids) for r in reqs)
    return {"tokens": toks, "wall": wall, "captures": (eng.graphs.captures if eng.graphs else 0) - c0,
            "steps": steps_since(eng, s0)}


def median_run(runs: list[dict]) -> dict:
    """The run of median tokens/s among `runs` (with `--repeat`), the range of all of them in its notes."""
    if len(runs) == 1:
        return runs[0]
    rates = sorted((r["tokens"] / r["wall"], i) for i, r in enumerate(runs))
    mid = runs[rates[len(runs) // 2][1]]
    return {**mid, "spread": f"median of {len(runs)} runs, {rates[0][0]:.0f}-{rates[-1][0]:.0f} tok/s"}


def steps_since(eng, before: dict) -> str:
    """The engine's steps since `before` (its stats then): how a path fed it, beside how fast it ran."""
    d = {k: eng.stats[k] - before.get(k, 0) for k in ("decode_steps", "prefill_steps", "prefill_tokens")}
    return f"{d['decode_steps']} decode + {d['prefill_steps']} prefill steps ({d['prefill_tokens']} tokens)"


def profile_engine(eng, prompts: list[list[int]], n: int, params, device: str) -> str:
    """The raw engine row once more under the torch profiler: is the run bound by the device (kernel time close
    to wall time) or by the host, and which kernels and step kinds it spends on."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    before = dict(eng.stats)
    with profile(activities=acts) as prof:
        r = run_engine(eng, prompts, n, params, device)
    steps = {k: v - before.get(k, 0) for k, v in eng.stats.items() if isinstance(v, int) and k != "peak_blocks"}
    events = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
    kernels = sorted(((e.self_device_time_total, e.count, e.key) for e in events), reverse=True)
    busy = sum(t for t, _, _ in kernels) / 1e6
    dec = max(1, steps.get("decode_steps", 0))
    lines = [f"profiled engine run: {r['tokens']} tokens in {r['wall']:.2f} s (profiler on); kernel time "
             f"{busy:.2f} s = {busy / r['wall']:.0%} of wall; {r['wall'] / dec * 1e3:.2f} ms wall and "
             f"{busy / dec * 1e3:.2f} ms kernels per decode step; engine counts {steps}"]
    lines += [f"   {t / 1e3:9.1f} ms {c:7d}x  {k[:70]}" for t, c, k in kernels[:18]]
    cpu = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    lines += ["host (self CPU) top ops:"] + [f"   {e.self_cpu_time_total / 1e3:9.1f} ms {e.count:7d}x  {e.key[:70]}"
                                            for e in cpu]
    return "\n".join(lines)


async def run_pipeline(backend, strategy: str, problems: list[dict], concurrency: int) -> dict:
    from ttscale.pipeline import Pipeline

    eng = backend.engine
    eng.prefix.clear()
    c0 = eng.graphs.captures if eng.graphs else 0
    s0 = dict(eng.stats)
    pipe = Pipeline(backend, strategy, concurrency=concurrency, seed=0)
    t0 = time.perf_counter()
    results = await pipe.run(problems)
    wall = time.perf_counter() - t0
    toks = sum(r.usage.generated_tokens for r in results)
    acc = sum(bool(r.correct) for r in results) / max(1, len(results))
    return {"tokens": toks, "wall": wall, "acc": acc,
            "captures": (eng.graphs.captures if eng.graphs else 0) - c0, "steps": steps_since(eng, s0)}


def run_generate(folder: str, dtype, device: str, prompts: list[list[int]], n: int, max_tokens: int,
                 batch: int, eos: set[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    kw = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "num_return_sequences": n,
          "pad_token_id": 0, "eos_token_id": sorted(eos) or None}

    def once(chunk: list[list[int]], new: int) -> int:
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, **kw)[:, width:].tolist()
        made = 0
        for row in out:
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            made += len(row) if stop is None else stop + 1
        return made

    with torch.inference_mode():
        once(prompts[:1], 4)
        sync(device)
        t0 = time.perf_counter()
        toks = sum(once(prompts[i:i + batch], max_tokens) for i in range(0, len(prompts), batch))
        sync(device)
        wall = time.perf_counter() - t0
    return {"tokens": toks, "wall": wall}


async def run_eval_inprocess(backend, strategy: str, problems: list[dict], concurrency: int, work: Path) -> dict:
    """`evaluate()` (what `ttscale eval` runs) in this process on the same engine, with a SQLite store: the eval
    layer's own cost (claims, grading every trace, a row per problem, progress meters) apart from process
    start, model load and compiles, which the `eval` row also pays."""
    import sqlite3

    from ttscale.evals.datasets import Dataset
    from ttscale.evals.runner import evaluate
    from ttscale.evals.store import ResultStore
    from ttscale.types import Problem

    backend.engine.prefix.clear()
    graphs = backend.engine.graphs
    c0 = graphs.captures if graphs else 0
    s0 = dict(backend.engine.stats)
    tag = time.time_ns()
    ds = Dataset("e2e", [Problem(**p) for p in problems], "benchmarks/e2e_throughput.py", key=f"e2e-{tag}")
    db = work / f"inprocess-{tag}.sqlite"
    store = ResultStore(db)
    t0 = time.perf_counter()
    await evaluate(ds, [strategy], backend, store, backend_spec="engine", concurrency=concurrency)
    wall = time.perf_counter() - t0
    con = sqlite3.connect(db)
    try:
        toks, errors = con.execute("SELECT SUM(generated_tokens), SUM(error IS NOT NULL) FROM results").fetchone()
    finally:
        con.close()
    if errors:
        raise RuntimeError(f"in-process eval: {errors} problems failed (see {db})")
    return {"tokens": int(toks), "wall": wall, "captures": (graphs.captures if graphs else 0) - c0,
            "steps": steps_since(backend.engine, s0)}


# ---- subprocess paths -----------------------------------------------------------------------------------
def _cli(log_captures: bool = False) -> list[str]:
    """The `ttscale` command in this interpreter; `log_captures`: with the engine's CUDA-graph captures on
    stderr, each line prefixed by its epoch time (`_captures_after` counts them)."""
    setup = ("import logging; h = logging.StreamHandler(); h.setFormatter(logging.Formatter('%(created).3f "
             "%(message)s')); g = logging.getLogger('ttscale.engine'); g.addHandler(h); g.setLevel(logging.INFO); "
             if log_captures else "")
    return [sys.executable, "-c", setup + "from ttscale.cli import main; main()"]


CAPTURE_LINE = re.compile(r"^(\d+\.\d+) captured CUDA graph \d+ .* in (\d+) ms$", re.M)


def _captures_after(stderr: str, since: float) -> tuple[int, float]:
    """(count, seconds) of the graph captures logged at or after epoch time `since`."""
    hits = [float(ms) / 1e3 for t, ms in CAPTURE_LINE.findall(stderr) if float(t) >= since]
    return len(hits), sum(hits)


def run_eval(folder: str, problems: list[dict], n: int, max_tokens: int, concurrency: int, work: Path,
             env: dict) -> dict:
    """`ttscale eval` in a fresh process: self-consistency twice, the first (another seed) as the warm-up that
    the raw engine row also gets (Triton compiles and CUDA graphs for the same batch shapes); the second run's
    rate from the store. `cold` is the whole process, load and warm-up included."""
    data = work / "data"
    data.mkdir(exist_ok=True)
    (data / "e2e.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    db = work / f"e2e-{time.time_ns()}.sqlite"
    cmd = _cli(log_captures=True) + [
                    "eval", "--dataset", "e2e", "--data-dir", str(data), "--backend", f"engine:{folder}",
                    "-s", f"self-consistency:n={n},seed=1", "-s", f"self-consistency:n={n}", "-c", str(concurrency),
                    "--max-tokens", str(max_tokens), "--db", str(db), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    cold = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ttscale eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    con = sqlite3.connect(db)
    rates = []
    for run_id, created in con.execute("SELECT run_id, created_at FROM runs ORDER BY created_at"):
        toks, end = con.execute("SELECT SUM(generated_tokens), MAX(finished_at) FROM results WHERE run_id=?",
                                (run_id,)).fetchone()
        rates.append((toks, end - created, created))
    all_toks = sum(t for t, _, _ in rates)
    toks, wall, created = rates[-1]
    captures, capture_s = _captures_after(proc.stderr, created)
    return {"tokens": toks, "wall": wall, "cold_tokens": all_toks, "cold_wall": cold, "captures": captures,
            "capture_s": capture_s}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(folder: str, problems: list[dict], n: int, max_tokens: int, env: dict) -> dict:
    """`ttscale serve --backend engine:MODEL`, then every problem at once through the openai client."""
    import httpx
    from openai import AsyncOpenAI

    port = _free_port()
    cmd = _cli() + ["serve", "--backend", f"engine:{folder}", "--port", str(port), "--served-model-name", "e2e",
                    "--max-n", str(max(64, n)), "--max-tokens", str(max(8192, max_tokens))]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ttscale serve exited: {proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(url + "/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ttscale serve did not come up in 300 s")
            time.sleep(0.5)

        async def go(probs: list[dict], new: int) -> int:
            client = AsyncOpenAI(base_url=url, api_key="none", timeout=3600, max_retries=0)

            async def one(p: dict) -> int:
                r = await client.chat.completions.create(
                    model=f"self-consistency-{n}/e2e", max_tokens=new, temperature=0.6, top_p=0.95,
                    messages=[{"role": "user", "content": p["prompt"]}])
                return r.usage.completion_tokens

            try:
                return sum(await asyncio.gather(*(one(p) for p in probs)))
            finally:
                await client.close()

        asyncio.run(go(problems, max_tokens))  # warm-up at the measured shapes, as the raw engine row gets
        t0 = time.perf_counter()
        toks = asyncio.run(go(problems, max_tokens))
        wall = time.perf_counter() - t0
        return {"tokens": toks, "wall": wall}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


# ---- main ---------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for random shapes (default: SmolLM2's)")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--paths", default="engine,bare,pipeline,eval,serve,generate")
    ap.add_argument("--generate-batch", type=int, default=None, help="prompts per generate() call (default all)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch and subprocesses)")
    ap.add_argument("--kv-memory-gb", type=float, default=None)
    ap.add_argument("--stream-interval-ms", type=float, default=None, help="EngineBackend hand-off interval")
    ap.add_argument("--gil-switch-ms", type=float, default=None, help="EngineBackend GIL switch interval "
                    "(0: leave Python's)")
    ap.add_argument("--gc-gen0", type=int, default=None, help="EngineBackend GC threshold while it runs "
                    "(0: leave the GC alone, as before)")
    ap.add_argument("--handoff-share", type=float, default=None, help="EngineBackend hand-off share "
                    "(1: hand-offs every stream interval, as before)")
    ap.add_argument("--host-only", action="store_true", help="near-free forward and sampler: host work only")
    ap.add_argument("--device-ms", type=float, default=0.0, help="with --host-only: each step also takes this "
                    "long on a simulated device that the host work overlaps (a GPU's step time)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each path but serve and generate (engine, "
                    "pipeline, eval-inprocess, and `ttscale eval` as that many fresh processes): the row is the "
                    "median run, its notes give the range (a 1-2 s run swings 10-25 %% from one to the next)")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("--profile", action="store_true", help="run the raw engine once more under the torch "
                    "profiler: kernel time against wall time, the top kernels, the engine's step counts")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ttscale.backends.engine import Engine
    from ttscale.backends.engine.backend import EngineBackend, to_params
    from ttscale.backends.engine.loader import load_model, load_tokenizer
    from ttscale.strategies.registry import make_strategy

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    work = Path(tempfile.mkdtemp(prefix="ttscale-e2e-"))
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if args.host_only and not set(paths) <= {"engine", "bare", "pipeline", "eval-inprocess"}:
        raise SystemExit("--host-only stubs this process's engine: use it with --paths "
                         "engine,bare,pipeline,eval-inprocess")
    if args.host_only and args.device == "cuda":
        raise SystemExit("--host-only is for --device cpu (on CUDA the step runs through captured graphs)")
    folder, label = resolve_model(args.model, dtype, args.tokenizer, work)
    sc = f"self-consistency:n={args.n},max_tokens={args.max_tokens}"
    strategy = make_strategy(sc)
    problems = make_problems(args.problems)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])

    hw = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    head = (f"{label} {str(dtype).removeprefix('torch.')} on {device} (torch {torch.__version__}, {hw}); "
            f"{args.problems} problems x n={args.n} = {args.problems * args.n} branches at once, "
            f"max {args.max_tokens} new tokens, temperature 0.6, top_p 0.95")
    log(head)
    res: dict[str, dict] = {}
    model = load_model(folder, dtype=dtype, device=device)
    tok = load_tokenizer(folder)
    eos = set(model.cfg.eos_token_ids)
    prompts = prompt_ids(tok, strategy, problems)
    user = to_params(strategy.config.sampling())
    eng = Engine(model, tok, kv_memory_gb=args.kv_memory_gb)
    if args.host_only:
        make_host_only(eng, tok, args.device_ms)
        head += " (host only: forward and sampler stubbed" + (
            f", {args.device_ms:g} ms a step on a simulated device)" if args.device_ms else ")")
    t0 = time.perf_counter()
    warm = run_engine(eng, prompts, args.n, user, device)  # Triton kernels, CUDA graphs, allocator
    log(f"warm-up (raw engine, same workload): {warm['tokens']} tokens in {time.perf_counter() - t0:.1f}s, "
        f"{warm['captures']} graph captures")
    if "engine" in paths:
        res["engine"] = median_run([run_engine(eng, prompts, args.n, user, device) for _ in range(args.repeat)])
        log(f"engine: {res['engine']}")
    if args.profile:
        log(profile_engine(eng, prompts, args.n, user, device))
    if "bare" in paths:
        bare = user.model_copy(update={"temperature": 1.0, "top_p": 1.0, "ignore_eos": True,
                                       "detokenize": False})
        res["bare"] = run_engine(eng, prompts, args.n, bare, device)
        log(f"bare: {res['bare']}")
    if {"pipeline", "eval-inprocess"} & set(paths):
        opts = {}
        if args.stream_interval_ms is not None:
            opts["stream_interval_ms"] = args.stream_interval_ms
        if args.gil_switch_ms is not None:
            opts["gil_switch_ms"] = args.gil_switch_ms or None
        if args.gc_gen0 is not None:
            opts["gc_gen0"] = args.gc_gen0 or None
        if args.handoff_share is not None:
            opts["handoff_share"] = args.handoff_share
        backend = EngineBackend(engine=eng, **opts)

        async def in_process() -> None:
            try:
                if "pipeline" in paths:
                    res["pipeline"] = median_run([await run_pipeline(backend, sc, problems, args.problems)
                                                  for _ in range(args.repeat)])
                    log(f"pipeline: {res['pipeline']}")
                if "eval-inprocess" in paths:
                    res["eval-inprocess"] = median_run([
                        await run_eval_inprocess(backend, sc, problems, args.problems, work)
                        for _ in range(args.repeat)])
                    log(f"eval-inprocess: {res['eval-inprocess']}")
            finally:
                await backend.close()

        asyncio.run(in_process())
    del eng, model
    if device == "cuda":
        torch.cuda.empty_cache()
    if "eval" in paths:
        res["eval"] = median_run([run_eval(folder, problems, args.n, args.max_tokens, args.problems, work, env)
                                  for _ in range(args.repeat)])
        log(f"eval: {res['eval']}")
    if "serve" in paths:
        res["serve"] = run_serve(folder, problems, args.n, args.max_tokens, env)
        log(f"serve: {res['serve']}")
    if "generate" in paths:
        res["generate"] = run_generate(folder, dtype, device, prompts, args.n, args.max_tokens,
                                       args.generate_batch or len(prompts), eos)

    base = res.get("engine")
    gen = res.get("generate")
    hdr = f"{'path':>14} | {'tokens':>8} | {'wall s':>7} | {'tok/s':>9} | {'x engine':>8} | {'x generate':>10} | notes"
    lines = [head, hdr]
    for name, r in res.items():
        rate = r["tokens"] / r["wall"]
        xe = f"{rate / (base['tokens'] / base['wall']):.2f}x" if base else "-"
        xg = f"{rate / (gen['tokens'] / gen['wall']):.1f}x" if gen else "-"
        notes = []
        if "capture_s" in r:
            notes.append(f"{r['captures']} graph captures ({r['capture_s']:.1f} s) in the measured run")
        elif "captures" in r:
            notes.append(f"{r['captures']} graph captures")
        if "steps" in r:
            notes.append(r["steps"])
        if "spread" in r:
            notes.append(r["spread"])
        if "acc" in r:
            notes.append(f"acc {r['acc']:.2f}")
        if "cold_wall" in r:
            notes.append(f"cold process incl. load + warm-up: {r['cold_tokens'] / r['cold_wall']:.0f} tok/s "
                         f"over {r['cold_wall']:.1f}s")
        lines.append(f"{name:>14} | {r['tokens']:>8} | {r['wall']:>7.2f} | {rate:>9.1f} | {xe:>8} | {xg:>10} | "
                     + "; ".join(notes))
    log("\n".join(lines[1:]))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write("$ python " + " ".join(sys.argv) + "\n" + "\n".join(lines) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
