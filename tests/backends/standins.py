"""Small FastAPI servers on loopback that speak a wire format, for tests of HTTP backends.

They are stand-ins only where no real server can run here: an endpoint that fails on purpose
(retries), and SGLang's native API (SGLang itself needs a GPU). Their "model" is a deterministic
function of the input so tests can compute what the backend must return.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

CONTEXT = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    """Run `app` with uvicorn on a free loopback port in this event loop; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise RuntimeError(f"stand-in server did not start: {task.exception() if task.done() else 'timeout'}")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def next_token(prev: int, i: int) -> int:
    return (prev * 31 + 7 + i) % 1000


def token_logprob(tok: int) -> float:
    return -0.01 * (tok % 100) - 0.05


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def openai_app(fail_first: int = 0, fail_status: int = 503, api_key: str | None = None,
               retry_after: str | None = None) -> FastAPI:
    """A minimal OpenAI-compatible completions server; the first `fail_first` POSTs fail."""
    app = FastAPI()
    app.state.posts = 0
    app.state.bodies = []
    app.state.active = 0
    app.state.peak = 0

    def auth_error(request: Request) -> JSONResponse | None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "Invalid API key"}}, status_code=401)
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        return auth_error(request) or {"data": [{"id": "standin", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        if (err := auth_error(request)) is not None:
            return err
        body = await request.json()
        app.state.posts += 1
        app.state.bodies.append(body)
        if app.state.posts <= fail_first:
            headers = {"retry-after": retry_after} if retry_after else {}
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=fail_status, headers=headers)
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) >= CONTEXT:
            return JSONResponse(
                {"error": {"message": f"This model's maximum context length is {CONTEXT} tokens. However, your "
                                      f"prompt contains {len(prompt)} input tokens."}}, status_code=400)
        n = int(body.get("max_tokens", 4))
        if not body.get("stream"):
            toks = [next_token(0, i) for i in range(n)]
            return {"choices": [{"index": 0, "text": "".join(f"t{t} " for t in toks), "finish_reason": "length",
                                 "logprobs": {"tokens": [f"token_id:{t}" for t in toks],
                                              "token_logprobs": [token_logprob(t) for t in toks]}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": n}}

        async def gen():
            app.state.active += 1
            app.state.peak = max(app.state.peak, app.state.active)
            try:
                for i in range(n):
                    await asyncio.sleep(0.005)  # the stand-in's decode time per token
                    tok = next_token(0, i)
                    yield sse({"choices": [{"index": 0, "text": f"t{tok} ", "finish_reason": "length" if i == n - 1 else None,
                                            "logprobs": {"tokens": [f"token_id:{tok}"], "token_logprobs": [token_logprob(tok)],
                                                         "top_logprobs": [{f"token_id:{tok}": token_logprob(tok)}]}}]})
                yield sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
                yield "data: [DONE]\n\n"
            finally:
                app.state.active -= 1

        return StreamingResponse(gen(), media_type="text/event-stream")

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
