"""Small FastAPI servers on loopback that speak a wire format, for tests of HTTP backends.

They are stand-ins only where no real server can run here: an endpoint that fails on purpose
(retries, hangs, garbage), and SGLang's native API (SGLang itself needs a GPU). Their "model" is a
deterministic function of the input so tests can compute what the backend must return.

`openai_app` misbehaves per request when the model name carries modes after `+` (`standin+hang`,
`standin+no-counts+no-limit`), so one server serves well-behaved and broken "models" side by side:

- `hang`: takes the request and never answers (until the client goes away);
- `stall`: streams `STALL_AFTER` tokens, then sends nothing more (until the client goes away);
- `die`: streams `STALL_AFTER` tokens, then drops the connection mid-stream;
- `500`: answers 500 with an OpenAI-style error;
- `html`: answers 200 with an HTML page (`text/html`); `html-json`: the same page claiming `application/json`;
- `bad-sse`: streams one good chunk, then a line that is not JSON;
- `no-counts`: no logprobs, no token ids: the token count comes only with the final usage chunk;
- `no-limit`: ignores `max_tokens` (streams up to `NO_LIMIT_TOKENS` tokens).
- `staggered`: a request with seed s streams `max_tokens - 8 * (s % 4)` tokens (at least 1), so parallel
  branches of one strategy end at different times and the first-finished one leaves the others mid-stream.

Modes with written text (streamed one space-separated word per chunk, no token counts, cut at `max_tokens`
words with finish reason "length"):

- `think`: `THINKING` and `ANSWER_SECTION` as one text, `<think>…</think>` inline (a model served without a
  reasoning parser); `reasoning`: `THINKING` in `reasoning_content` deltas, then `ANSWER_SECTION` as
  content (vLLM with `--reasoning-parser`; completions get the `think` text). The thinking boxes a wrong
  answer last, so a grader that reads the whole text gets `THINK_WRONG`, one reading the answer gets
  `THINK_RIGHT`.
- `haiku`, `ramble`: the text `HAIKUS[seed % 4]` / `RAMBLES[seed % 4]` (seed 0 without one); the first is
  longer than 16 words and streams without delay, the others take `WRITTEN_DELAY_S` a word, so with
  `max_tokens=16` the truncated trace finishes first.

`app.state` counts what a test needs to see that upstream work stopped: `active` (streams being sent),
`hanging` (requests held by `hang`/`stall`), `closed` (streams the client left before their end),
`model_gets` (`/v1/models` calls), and `models_hang` (set it to make `/v1/models` hang).

`counting_app` answers every generation with a fixed `\\boxed{7}` and counts POSTs by path, so a proxy test
can prove a refused request started nothing upstream. `serve` runs a stand-in on the test's event loop;
`ThreadedServer` runs any ASGI app (a stand-in, or the ttscale proxy) in a thread for synchronous tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

CONTEXT = 2048
MODEL = "standin"
MODES = ("hang", "stall", "die", "500", "html", "html-json", "bad-sse", "no-counts", "no-limit", "think",
         "reasoning", "haiku", "ramble", "staggered")
THINK_RIGHT, THINK_WRONG = "7", "3"
THINKING = "Three plus four. Is it \\boxed{3}? No, that was three alone. The sum is seven, not \\boxed{3}."
ANSWER_SECTION = "The answer is 7"
HAIKUS = (("Autumn leaves falling and falling and falling over the old gate where the wind keeps on "
           "blowing the leaves"),
          "Cold rain on the stone\nA frog waits in the dark pond\nSilence, then the splash.",
          "cold rain on the stone.\na frog waits in the dark pond\nsilence then the splash",
          "Old pond in the spring\nA frog leaps into the deep\nSilence — then the splash!")
RAMBLES = ("So the answer is \\boxed{7}.\nLet me check it once more, and again, and again, and again and again",
           "Adding them gives \\boxed{7}.", "Three and four make \\boxed{7}.", "I think it is \\boxed{9}.")
WRITTEN_DELAY_S = 0.03
STALL_AFTER = 2
NO_LIMIT_TOKENS = 5000
HTML = "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    """Run `app` with uvicorn on a free loopback port in this event loop; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise RuntimeError(f"stand-in server did not start: {task.exception() if task.done() else 'timeout'}")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.state.stopping = True  # ends the stand-in's deliberate hangs
        server.should_exit = True
        await task


class ThreadedServer:
    """An ASGI app under uvicorn in a background thread (its own event loop) on a free loopback port, so a
    synchronous test can drive clients and subprocesses meanwhile; `uvicorn_options` go to uvicorn.Config."""

    def __init__(self, app: Any, name: str = "standin", **uvicorn_options: Any) -> None:
        self.app = app
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **uvicorn_options))
        self.thread = threading.Thread(target=self.server.run, name=f"{name}-{self.port}", daemon=True)

    def start(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} server did not start")
            time.sleep(0.02)  # waiting for uvicorn's started flag, bounded by the deadline
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def next_token(prev: int, i: int) -> int:
    return (prev * 31 + 7 + i) % 1000


def token_logprob(tok: int) -> float:
    return -0.01 * (tok % 100) - 0.05


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk_choice(chat: bool, piece: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
    """One streamed choice: a chat `delta` or a completion `text` piece."""
    return {"index": 0, "finish_reason": finish, "logprobs": logprobs,
            **({"delta": {"content": piece}} if chat else {"text": piece})}


def completion_body(chat: bool, texts: list[str], model: str, use: dict[str, int], finish: str = "stop",
                    logprobs: Any = None) -> dict[str, Any]:
    """A non-streamed chat or completion response with one choice per text."""
    choices = [{"index": i, "finish_reason": finish, "logprobs": logprobs,
                **({"message": {"role": "assistant", "content": t}} if chat else {"text": t})}
               for i, t in enumerate(texts)]
    return {"id": "x", "object": "chat.completion" if chat else "text_completion", "model": model,
            "choices": choices, "usage": use}


async def stream_words(text: str, chat: bool, model: str, prompt_tokens: int,
                       delay_s: float = 0.0) -> AsyncIterator[str]:
    """`text` streamed one space-separated word per chunk, then a usage chunk and `[DONE]`."""
    words = text.split(" ")
    for i, w in enumerate(words):
        if delay_s:
            await asyncio.sleep(delay_s)  # the stand-in's decode time per word
        choice = chunk_choice(chat, w if i == 0 else " " + w, "stop" if i == len(words) - 1 else None)
        yield sse({"id": "x", "model": model, "choices": [choice]})
    yield sse({"id": "x", "model": model, "choices": [], "usage": usage(prompt_tokens, len(words))})
    yield "data: [DONE]\n\n"


def add_generation_routes(app: FastAPI, generate: Callable[[Request, bool], Awaitable[Any]]) -> None:
    """Route `/v1/chat/completions` and `/v1/completions` to `generate(request, chat)`."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, False)


def model_modes(model: str) -> set[str]:
    """The misbehaviours a model name asks for (`standin+hang+...`); unknown ones are an error."""
    modes = set(model.split("+")[1:])
    if unknown := modes - set(MODES):
        raise ValueError(f"unknown stand-in modes {sorted(unknown)}; known: {', '.join(MODES)}")
    return modes


def written_text(modes: set[str], seed: int | None) -> list[tuple[str, str]] | None:
    """(delta field, text) pieces a written-text mode answers with (module docstring), or None."""
    if "think" in modes:
        return [("content", f"<think>{THINKING}</think>\n\n{ANSWER_SECTION}")]
    if "reasoning" in modes:
        return [("reasoning_content", THINKING), ("content", ANSWER_SECTION)]
    for mode, texts in (("haiku", HAIKUS), ("ramble", RAMBLES)):
        if mode in modes:
            return [("content", texts[(seed or 0) % len(texts)])]
    return None


async def stream_written(pieces: list[tuple[str, str]], chat: bool, model: str, max_tokens: int,
                         delay_s: float) -> AsyncIterator[str]:
    """`pieces` one word per chunk in their delta fields (completions: all as text), cut at `max_tokens` words."""
    words = [(f, w if i == 0 else " " + w) for f, text in pieces for i, w in enumerate(text.split(" "))]
    finish = "length" if len(words) > max_tokens else "stop"
    words = words[:max_tokens]
    for i, (f, w) in enumerate(words):
        if delay_s:
            await asyncio.sleep(delay_s)  # the stand-in's decode time per word
        done = finish if i == len(words) - 1 else None
        choice = {"index": 0, "finish_reason": done, "logprobs": None,
                  **({"delta": {f: w}} if chat else {"text": w})}
        yield sse({"id": "x", "model": model, "choices": [choice]})
    yield sse({"id": "x", "model": model, "choices": [], "usage": usage(3, len(words))})
    yield "data: [DONE]\n\n"


def _token_chunk(chat: bool, tok: int, finish: str | None, counts: bool) -> dict[str, Any]:
    """One streamed token as vLLM sends it (token ids inside logprobs' token strings when `counts`)."""
    logprobs = None
    if counts and chat:
        logprobs = {"content": [{"token": f"token_id:{tok}", "logprob": token_logprob(tok), "top_logprobs": []}]}
    elif counts:
        logprobs = {"tokens": [f"token_id:{tok}"], "token_logprobs": [token_logprob(tok)],
                    "top_logprobs": [{f"token_id:{tok}": token_logprob(tok)}]}
    return {"object": "chat.completion.chunk" if chat else "text_completion",
            "choices": [chunk_choice(chat, f"t{tok} ", finish, logprobs)]}


STAGGER_TOKENS = 8  # `staggered`: tokens fewer per seed step


def openai_app(fail_first: int = 0, fail_status: int = 503, api_key: str | None = None,
               retry_after: str | None = None, delay_s: float = 0.005) -> FastAPI:
    """A minimal OpenAI-compatible server (completions and chat); the first `fail_first` POSTs fail, and a
    model name with `+MODE`s misbehaves (module docstring). Token i is `next_token(0, i)`."""
    app = FastAPI()
    app.state.posts = 0
    app.state.bodies = []
    app.state.active = 0
    app.state.peak = 0
    app.state.hanging = 0
    app.state.closed = 0
    app.state.models_hang = False
    app.state.model_gets = 0
    app.state.stopping = False

    def auth_error(request: Request) -> JSONResponse | None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "Invalid API key"}}, status_code=401)
        return None

    async def hold(request: Request | None = None) -> None:
        """Hang until the client goes away or the stand-in stops (polls: this is the server's own wait)."""
        app.state.hanging += 1
        try:
            while not app.state.stopping and not (request is not None and await request.is_disconnected()):
                await asyncio.sleep(0.02)
        finally:
            app.state.hanging -= 1

    @app.get("/v1/models")
    async def models(request: Request):
        app.state.model_gets += 1
        if app.state.models_hang:
            await hold(request)
        names = ["standin"] + [f"standin+{m}" for m in MODES] + ["standin+no-counts+no-limit"]
        return auth_error(request) or {"data": [{"id": m, "object": "model"} for m in names]}

    async def answer(request: Request, chat: bool):
        if (err := auth_error(request)) is not None:
            return err
        body = await request.json()
        app.state.posts += 1
        app.state.bodies.append(body)
        if app.state.posts <= fail_first:
            headers = {"retry-after": retry_after} if retry_after else {}
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=fail_status, headers=headers)
        modes = model_modes(str(body.get("model", "standin")))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) >= CONTEXT:
            return JSONResponse(
                {"error": {"message": f"This model's maximum context length is {CONTEXT} tokens. However, your "
                                      f"prompt contains {len(prompt)} input tokens."}}, status_code=400)
        if "hang" in modes:
            await hold(request)
            return JSONResponse({"error": {"message": "the client went away"}}, status_code=499)
        if "500" in modes:
            return JSONResponse({"error": {"message": "internal failure", "type": "InternalServerError"}},
                                status_code=500)
        if "html" in modes or "html-json" in modes:
            media = "application/json" if "html-json" in modes else "text/html"
            return Response(HTML, media_type=media)
        n = int(body.get("max_tokens", 4))
        written = written_text(modes, body.get("seed"))
        if written is not None and body.get("stream"):
            slow = ("haiku" in modes or "ramble" in modes) and (body.get("seed") or 0) % 4 != 0
            return StreamingResponse(stream_written(written, chat, str(body["model"]), n,
                                                    WRITTEN_DELAY_S if slow else 0.0),
                                     media_type="text/event-stream")
        counts = "no-counts" not in modes
        if "no-limit" in modes:
            n = NO_LIMIT_TOKENS
        if "staggered" in modes:
            n = max(1, n - STAGGER_TOKENS * ((body.get("seed") or 0) % 4))
        if not body.get("stream"):
            toks = [next_token(0, i) for i in range(n)]
            logprobs = None
            if counts and not chat:
                logprobs = {"tokens": [f"token_id:{t}" for t in toks],
                            "token_logprobs": [token_logprob(t) for t in toks]}
            return completion_body(chat, ["".join(f"t{t} " for t in toks)], str(body.get("model", MODEL)), usage(3, n),
                                   finish="length", logprobs=logprobs)

        async def gen():
            app.state.active += 1
            app.state.peak = max(app.state.peak, app.state.active)
            complete = False
            try:
                if chat:
                    yield sse({"object": "chat.completion.chunk",
                               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
                for i in range(n):
                    await asyncio.sleep(delay_s)  # the stand-in's decode time per token
                    if i == STALL_AFTER and "stall" in modes:
                        await hold()
                        return
                    if i == STALL_AFTER and "die" in modes:
                        raise ConnectionResetError("the stand-in dies mid-stream")
                    if i == 1 and "bad-sse" in modes:
                        yield 'data: {"choices": [{"index": 0, "text": "t1 \n\n'
                        continue
                    tok = next_token(0, i)
                    yield sse(_token_chunk(chat, tok, "length" if i == n - 1 else None, counts))
                yield sse({"choices": [], "usage": usage(3, n)})
                yield "data: [DONE]\n\n"
                complete = True
            finally:
                app.state.active -= 1
                if not complete:
                    app.state.closed += 1

        return StreamingResponse(gen(), media_type="text/event-stream")

    add_generation_routes(app, answer)
    return app


def sglang_app(incremental: bool = False, delay_s: float = 0.005) -> FastAPI:
    """SGLang's native wire format: streaming /generate with `rid`, /abort_request, input logprobs."""
    app = FastAPI()
    app.state.bodies = []
    app.state.aborts = []
    aborted: set[str] = set()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "sgl-standin", "max_model_len": CONTEXT}]}

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await request.json()
        app.state.aborts.append(body["rid"])
        aborted.add(body["rid"])
        return {}

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        ids = body.get("input_ids") or [ord(c) % 1000 for c in body.get("text", "")]
        if len(ids) >= CONTEXT:
            return JSONResponse({"error": {"message": f"The input ({len(ids)} tokens) is longer than the model's "
                                                      f"context length ({CONTEXT} tokens)."}}, status_code=400)
        sp = body.get("sampling_params") or {}
        if not body.get("stream"):
            start = int(body.get("logprob_start_len", 0))
            entries = [[None if i == 0 else token_logprob(t), t, None] for i, t in enumerate(ids)][start:]
            return {"text": "", "meta_info": {"id": "x", "prompt_tokens": len(ids), "completion_tokens": 0,
                                              "input_token_logprobs": entries,
                                              "finish_reason": {"type": "length", "length": 0}}}
        rid, n, k = body["rid"], int(sp.get("max_new_tokens", 8)), int(body.get("top_logprobs_num", 0))

        async def gen():
            out: list[int] = []
            text = ""
            prev = ids[-1] if ids else 0
            for i in range(n):
                await asyncio.sleep(delay_s)  # the stand-in's decode time per token
                if rid in aborted:
                    finish = {"type": "abort", "message": "Abort before decoding"}
                    yield sse({"text": "" if incremental else text, "output_ids": [] if incremental else out,
                               "meta_info": {"id": rid, "finish_reason": finish, "prompt_tokens": len(ids),
                                             "completion_tokens": len(out), "cached_tokens": 0,
                                             "output_token_logprobs": [] if incremental else
                                             [[token_logprob(t), t, None] for t in out]}})
                    yield "data: [DONE]\n\n"
                    return
                prev = next_token(prev, i)
                out.append(prev)
                piece = f"t{prev} "
                text += piece
                new = [prev] if incremental else out
                finish = {"type": "length", "length": n} if i == n - 1 else None
                yield sse({
                    "text": piece if incremental else text, "output_ids": new,
                    "meta_info": {
                        "id": rid, "finish_reason": finish, "prompt_tokens": len(ids), "completion_tokens": len(out),
                        "cached_tokens": 2,
                        "output_token_logprobs": [[token_logprob(t), t, None] for t in new],
                        "output_top_logprobs": [[[token_logprob(t), t, f"t{t}"]] + [[-5.0, 999, "z"]] * (k - 1)
                                                for t in new] if k else None,
                    },
                })
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


COUNTING_ANSWER = "So the answer is \\boxed{7}."


def counting_app(model: str = MODEL) -> FastAPI:
    """Answers every generation (each prompt x n when not streamed) with `COUNTING_ANSWER`; `state.posts`
    counts POSTs by path, `/tokenize` included (it answers 404: no tokenizer here)."""
    app = FastAPI()
    app.state.posts = Counter()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "max_model_len": 4096}]}

    async def generate(request: Request, chat: bool):
        body = await request.json()
        app.state.posts[request.url.path] += 1
        if body.get("stream"):
            return StreamingResponse(stream_words(COUNTING_ANSWER, chat, model, prompt_tokens=5),
                                     media_type="text/event-stream")
        prompts = body.get("prompt") if not chat else None
        n = len(prompts) if isinstance(prompts, list) and prompts and isinstance(prompts[0], str) else 1
        n *= int(body.get("n") or 1)
        return completion_body(chat, [COUNTING_ANSWER] * n, model, usage(5, len(COUNTING_ANSWER.split(" ")) * n))

    add_generation_routes(app, generate)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        app.state.posts[request.url.path] += 1
        return JSONResponse({"error": {"message": "no tokenizer here"}}, status_code=404)

    return app


class CountingUpstream(ThreadedServer):
    """`counting_app()` in a thread; `posts` counts POSTs by path."""

    def __init__(self) -> None:
        super().__init__(counting_app(), name="counting-upstream", lifespan="off")

    @property
    def posts(self) -> Counter:
        return self.app.state.posts

    @property
    def generations(self) -> int:
        return self.posts["/v1/chat/completions"] + self.posts["/v1/completions"]
