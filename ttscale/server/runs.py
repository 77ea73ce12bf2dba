"""Strategy runs: one request's strategy executed in a Context on the upstream's (or the served) backend,
and its Result turned into an OpenAI completion, non-streamed or as server-sent events.

The answer's text (`answer_choice`): the text the strategy chose, else a finished trace whose answer is the
chosen answer; a trace cut at `max_tokens` only when no trace that stopped by itself has that answer, and with
no answer at all (a haiku under `kind: math`) the first trace that stopped by itself, so content is never
empty while any trace has text. A budget that ran out before any trace finished is a cut-off, as a
`max_tokens` cut is: the text of the first trace that has any (an aborted one), finish reason `length`.
Chat responses carry the section after `</think>` as `content` and the thinking as `reasoning` (vLLM's
reasoning parsers since 0.10) and `reasoning_content` (older vLLM, DeepSeek's API); completions carry the
whole text, and their prompt reaches the model as it is (`RawPrompt`). Logprobs, when asked, are those of the
trace the text is (in a stream: in the final chunk, with the finish reason).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal

from ttscale.answers import same_answer, split_reasoning, split_reasoning_partial
from ttscale.controller import Context
from ttscale.errors import BackendError
from ttscale.server.errors import ApiError, api_error_from
from ttscale.server.forwarding import ForwardedParams, RawPrompt, TokenRecord
from ttscale.server.protocol import (
    JSON_MEDIA,
    PROGRESS_KINDS,
    SSE_DONE,
    SSE_MEDIA,
    ServerOptions,
    StrategyBody,
    chat_logprobs,
    completion_logprobs,
    jsonable,
    sse,
    usage_dict,
)
from ttscale.strategies.base import Strategy, out_of_budget
from ttscale.types import BranchStatus, Event, Problem, Result, Trace

if TYPE_CHECKING:
    from ttscale.server.relay import Observer, Opened
    from ttscale.server.serving import Serving


def answer_choice(result: Result, kind: str = "math") -> tuple[str, str]:
    """The text a strategy's answer is given as, and its finish reason ("stop" | "length"); see the module
    docstring for the order of preference."""
    with_text: list[Trace] = sorted((t for t in result.traces if t.status is BranchStatus.finished and t.text),
                                    key=lambda t: (t.finish_order is None, t.finish_order or 0))
    stopped = [t for t in with_text if t.finish_reason != "length"]
    own = result.text or None
    if own is not None and not any(t.text == own for t in result.traces):
        return own, "stop"  # composed by the strategy (a distilled or summarised answer)
    if own is not None and any(t.text == own for t in stopped):
        return own, "stop"
    if result.answer is not None:
        for t in [*stopped, *with_text]:  # a cut trace only when no stopped one has the answer
            if same_answer(t.answer, result.answer, kind):
                return t.text, "length" if t.finish_reason == "length" else "stop"
    if own is not None:
        cut = any(t.text == own and t.finish_reason == "length" for t in result.traces)
        return own, "length" if cut else "stop"
    if stopped or with_text:
        t = (stopped or with_text)[0]
        return t.text, "length" if t.finish_reason == "length" else "stop"
    if out_of_budget(result):  # cut off as a max_tokens cut is: OpenAI clients read "length" as that
        return next((t.text for t in result.traces if t.text), ""), "length"
    return (f"\\boxed{{{result.answer}}}" if result.answer is not None else ""), "stop"


_DONE = object()  # the end of a run's event queue


class StrategyRun:
    """One strategy request: its problem, strategy, backend and the events it produces."""

    def __init__(self, serving: Serving, kind: Literal["chat", "completion"], body: StrategyBody,
                 strategy: Strategy, options: ServerOptions, base_model: str, problem: Problem):
        self.serving, self.kind, self.body, self.strategy = serving, kind, body, strategy
        self.options, self.base_model, self.problem = options, base_model, problem
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.t_end: float | None = None
        self.forwarded = body.sampling_updates()  # added to every generation the strategy starts
        self.chat_template_kwargs: dict[str, Any] | None = getattr(body, "chat_template_kwargs", None)
        self.logprobs_k = body.logprobs_wanted()
        self.records: dict[str, TokenRecord] = {}  # branch id -> its streamed tokens (logprobs asked)
        self.observer: Observer | None = None

    @property
    def streams_answer(self) -> bool:
        return self.strategy.name == "single" or bool(getattr(self.strategy, "streams_answer", False))

    def raw_prompt(self) -> RawPrompt | None:
        """A completion's prompt, sent to the model as it is (None on chat: messages are templated)."""
        if self.kind != "completion" or self.problem.prompt is None:
            return None
        return RawPrompt(self.strategy.messages(self.problem), self.problem.prompt)

    def api_error(self, exc: BaseException) -> ApiError:
        """The error the client sees; a prompt too long for the model names the route's prompt field."""
        return api_error_from(exc, prompt_param="messages" if self.kind == "chat" else "prompt")

    async def execute(self, listener: Callable[[Event], None] | None = None) -> Result:
        t0 = time.monotonic()
        outcome = "error"
        try:
            result = await self._execute(listener)
            outcome = "ok"
            return result
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.serving.metrics.strategy_run(self.strategy.name, outcome, time.monotonic() - t0)

    async def _execute(self, listener: Callable[[Event], None] | None) -> Result:
        backend = await self.serving.backend_for(self.base_model)
        self.strategy.check(backend)
        forwarding = None
        raw_prompt = self.raw_prompt()
        if self.forwarded or self.chat_template_kwargs or raw_prompt is not None:
            backend = forwarding = ForwardedParams(backend, self.forwarded, self.chat_template_kwargs,
                                                   record_logprobs=self.logprobs_k is not None,
                                                   raw_prompt=raw_prompt)
        ctx = Context(backend, budget=self.options.budget, listeners=[listener] if listener else (),
                      id_prefix=f"{uuid.uuid4().hex[:12]}-b")
        try:
            result = await self.strategy.run(self.problem, ctx)
        finally:
            await ctx.aclose()
        self.t_end = time.monotonic()
        branches = list(ctx.branches.values())
        if forwarding is not None and forwarding.records is not None:
            self.records = {b.id: forwarding.records[b.request.request_id] for b in branches
                            if b.request is not None and b.request.request_id in forwarding.records}
        self.serving.metrics.strategy_result(self.strategy.name, result)
        if self.observer is not None:
            self.observer.tokens(result.usage.prompt_tokens, result.usage.generated_tokens)
        if branches and not any(b.status is BranchStatus.finished for b in branches):
            failed = [b for b in branches if b.status is BranchStatus.failed]
            if failed:
                exc = failed[0].meta.get("exception")
                if isinstance(exc, BaseException):
                    raise exc
                raise BackendError(failed[0].error or "every branch failed")
        return result

    def answer_parts(self, result: Result) -> tuple[str, str | None, str]:
        """(content, reasoning_content or None, finish reason) of the response: chat splits the chosen text
        on `</think>`, completions keep it whole."""
        text, reason = answer_choice(result, self.problem.kind)
        if self.kind != "chat":
            return text, None, reason
        thinking, content = split_reasoning(text)
        return content, thinking or None, reason

    def logprobs(self, result: Result) -> dict[str, Any] | None:
        """OpenAI `logprobs` of the answer: those of the trace whose text it is (None when none were asked,
        or the answer is text the strategy composed, which no branch sampled as such)."""
        if self.logprobs_k is None:
            return None
        text, _ = answer_choice(result, self.problem.kind)
        trace: Trace | None = next((t for t in result.traces if t.text == text and t.id in self.records), None)
        if trace is None:
            return None
        rec = self.records[trace.id]
        shape = chat_logprobs if self.kind == "chat" else completion_logprobs
        return shape(rec.token_strings(), rec.logprobs, rec.top_logprobs, self.logprobs_k)

    def extension(self, result: Result) -> dict[str, Any]:
        ext: dict[str, Any] = {
            "strategy": self.strategy.spec, "answer": result.answer,
            "decision": jsonable({k: v for k, v in result.decision.items()}),
            "fallbacks": result.fallbacks, "usage": usage_dict(result.usage)["ttscale"],
        }
        if self.options.include_traces:
            ext["traces"] = [jsonable(t.model_dump(exclude={"token_ids", "logprobs", "token_times"}))
                             for t in result.traces]
        return ext

    def response_body(self, result: Result) -> dict[str, Any]:
        text, thinking, reason = self.answer_parts(result)
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            if thinking is not None:
                message["reasoning"] = message["reasoning_content"] = thinking
            choice = {"index": 0, "message": message, "logprobs": self.logprobs(result), "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": self.logprobs(result), "finish_reason": reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                "choices": [choice], "usage": usage_dict(result.usage), "ttscale": self.extension(result)}

    def chunk(self, text: str | None = None, *, finish: str | None = None, role: bool = False,
              ext: dict[str, Any] | None = None, usage: dict[str, Any] | None = None,
              no_choice: bool = False, reasoning: str | None = None,
              logprobs: dict[str, Any] | None = None) -> bytes:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
                delta["content"] = ""
            if reasoning:
                delta["reasoning"] = delta["reasoning_content"] = reasoning
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            obj = "text_completion"
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                               "choices": [] if no_choice else [choice]}
        if usage is not None:
            out["usage"] = usage
        if ext is not None:
            out["ttscale"] = ext
        return sse(out)

    async def _started(self) -> tuple[asyncio.Task, asyncio.Queue, list[Any]]:
        """The run started, once its first token has come (or it ended first): (task, event queue, the events
        so far). A run that fails before any token (an upstream refusing the prompt as too long, say) raises
        here, so the client gets that error's status rather than a 200 whose stream holds the error."""
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(self.execute(queue.put_nowait))
        task.add_done_callback(lambda _t: queue.put_nowait(_DONE))
        early: list[Any] = []
        try:
            while True:
                ev = await queue.get()
                early.append(ev)
                if ev is _DONE:
                    if (exc := task.exception()) is not None:
                        raise exc
                    break
                if ev.kind == "delta":
                    break
        except BaseException:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        return task, queue, early

    async def stream(self, task: asyncio.Task, queue: asyncio.Queue, early: list[Any]) -> AsyncIterator[bytes]:
        """SSE chunks: the answer as produced (single-branch strategies), progress, then the result."""
        pending = collections.deque(early)  # the events `_started` read, then the queue's
        progress = self.options.progress
        answer_branch: list[str] = []
        sent = ""
        raw = sent_thinking = ""  # the answer branch's text so far, and the thinking sent of it (chat)
        try:
            if self.kind == "chat":
                yield self.chunk(role=True)
            while True:
                ev = pending.popleft() if pending else await queue.get()
                if ev is _DONE:
                    break
                if ev.kind == "spawned" and not answer_branch:
                    answer_branch.append(ev.branch_id)
                if ev.kind == "delta":
                    if self.streams_answer and ev.branch_id == answer_branch[0]:
                        raw += ev.text
                        if self.kind != "chat":
                            sent += ev.text
                            yield self.chunk(ev.text)
                            continue
                        thinking, content = split_reasoning_partial(raw)
                        more_thinking = thinking.removeprefix(sent_thinking) if thinking.startswith(
                            sent_thinking) else ""
                        more = content.removeprefix(sent) if content.startswith(sent) else ""
                        sent_thinking += more_thinking
                        sent += more
                        if more or more_thinking:
                            yield self.chunk(more or None, reasoning=more_thinking or None)
                    elif progress == "deltas":
                        yield self.chunk(ext={"event": "delta", "branch": ev.branch_id, "text": ev.text,
                                              "n_tokens": ev.n_tokens})
                elif progress and ev.kind in PROGRESS_KINDS:
                    yield self.chunk(ext={"event": ev.kind, "branch": ev.branch_id, "text": ev.text,
                                          "data": jsonable(ev.data)})
            try:
                result = task.result()
            except Exception as exc:  # noqa: BLE001 - reported in the stream, OpenAI-shaped
                yield sse(self.api_error(exc).body())
                yield SSE_DONE
                return
            text, final_thinking, reason = self.answer_parts(result)
            rest = text.removeprefix(sent)
            ext = {"event": "done", "t_end": self.t_end, **self.extension(result)}
            if sent and not text.startswith(sent):
                ext["streamed_text_replaced"] = True
            yield self.chunk(rest or None, finish=reason, ext=ext,
                             reasoning=None if sent_thinking or sent else final_thinking,
                             logprobs=self.logprobs(result))
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                yield self.chunk(usage=usage_dict(result.usage), no_choice=True)
            yield SSE_DONE
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task


    async def response(self) -> Opened:
        """(status, media type, body or chunks) of this run, for `Relay`."""
        try:
            if self.body.stream:
                # Fail fast (before the 200 and the first chunk) when the upstream is down, the strategy cannot
                # run on it, or the run fails before its first token.
                self.strategy.check(await self.serving.backend_for(self.base_model))
                return 200, SSE_MEDIA, self.stream(*await self._started())
            result = await self.execute()
        except Exception as exc:
            raise self.api_error(exc) from exc
        return 200, JSON_MEDIA, json.dumps(self.response_body(result), default=str).encode()
