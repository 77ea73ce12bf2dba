"""The wire: request bodies a strategy request may carry, the checks every JSON body passes, and the pieces
of responses (usage with its `ttscale` extension, server-sent events, OpenAI-shaped logprobs).

A strategy request's fields fall in three groups. Sampling fields set the strategy's config (`temperature`,
`top_p`, `top_k`, `max_tokens` / `max_completion_tokens`, `seed`: branch i samples with seed + i). Fields
forwarded unchanged to every generation the strategy starts (`FORWARDED`: stop strings and ids, penalties,
`min_p`, `min_tokens`, `logit_bias`, `ignore_eos`, logprobs, chat `chat_template_kwargs`). Fields that cannot
apply to an answer chosen among branches (`REFUSED`: tools, structured output, `best_of`, ...) are a 400
naming the field and saying why; any other unknown field is a 400 naming it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ttscale.budget import Budget
from ttscale.server.errors import ApiError
from ttscale.types import StrictModel, Usage

JSON_MEDIA = "application/json"
SSE_MEDIA = "text/event-stream"
SERVER_KEYS = {"strategy", "budget", "kind", "progress", "include_traces"}  # the `ttscale` object's own keys
PROGRESS_KINDS = {"spawned", "finished", "aborted", "failed", "budget", "decision"}

_TOOLS = "the strategy chooses among free-text answers; tool calls cannot be voted on"
_STRUCTURED = "the strategy chooses among free-text answers; constrained output is not voted on"
REFUSED: dict[str, str] = {
    "tools": _TOOLS, "tool_choice": _TOOLS, "functions": _TOOLS, "function_call": _TOOLS,
    "parallel_tool_calls": _TOOLS, "response_format": _STRUCTURED, "structured_outputs": _STRUCTURED,
    "guided_json": _STRUCTURED, "guided_regex": _STRUCTURED, "guided_choice": _STRUCTURED,
    "guided_grammar": _STRUCTURED,
    "best_of": "the strategy chooses among its own branches (set their number with ttscale.n)",
    "prompt_logprobs": "a strategy answer carries the logprobs of the chosen branch's tokens only",
    "suffix": "a strategy answers one prompt without a suffix",
}


def _means_default(name: str, value: Any, body: dict[str, Any]) -> bool:
    """Whether a refused field's value asks for nothing (clients send `tools: []`, `response_format: {"type":
    "text"}`, `tool_choice: "none"` by default): such requests are served, not refused."""
    if value is None or value == [] or value == {}:
        return True
    if name == "response_format":
        return value == {"type": "text"}
    if name in ("tool_choice", "function_call"):
        return value == "none"
    if name == "parallel_tool_calls":
        return not body.get("tools") and not body.get("functions")
    return False


def without_default_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The body less the refused fields that ask for nothing (`_means_default`)."""
    drop = [name for name in REFUSED if name in body and _means_default(name, body[name], body)]
    return {k: v for k, v in body.items() if k not in drop} if drop else body


PASS_THROUGH_HINT = "send the request without a strategy to pass it through to the upstream"
"""What a proxy tells a client whose strategy request carries a field no strategy can apply (`refused_field`);
a server with no upstream says what it can do instead (`Serving.refusal_hint`)."""


def refused_field(body: dict[str, Any], hint: str = PASS_THROUGH_HINT) -> ApiError | None:
    """A 400 for the first field of a strategy request that cannot apply to it (None when there is none); `hint`
    says where such a request can go instead. `n` above 1 is one: a strategy answers one choice."""
    for name, why in REFUSED.items():
        if not _means_default(name, body.get(name), body):
            return ApiError(400, f"'{name}' cannot apply to a strategy request: {why} ({hint})", param=name,
                            code="unsupported_parameter")
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        return ApiError(400, f"'n' ({n}) cannot apply to a strategy request: a strategy answers one choice (set "
                        f"its branch count with ttscale.n or the model prefix, STRATEGY-N/MODEL) ({hint})",
                        param="n", code="unsupported_parameter")
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class StrategyBody(BaseModel):
    """Fields a strategy request may carry (anything else is a 400 naming the field)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=1, description="strategies answer one choice; their branch count is ttscale.n")
    seed: int | None = None
    user: str | None = None
    ttscale: dict[str, Any] | None = None
    # Forwarded to every generation the strategy starts.
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0)
    logit_bias: dict[int, float] | None = None
    ignore_eos: bool = False

    def sampling_updates(self) -> dict[str, Any]:
        """The SamplingSpec fields this request sets for every branch (beyond the strategy's config)."""
        out: dict[str, Any] = {}
        if self.stop:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.include_stop_str_in_output:
            out["include_stop_str"] = True
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
                     "logit_bias"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.ignore_eos:
            out["ignore_eos"] = True
        k = self.logprobs_wanted()
        if k is not None:
            out["logprobs"] = k
        return out

    def logprobs_wanted(self) -> int | None:
        """Top-k of the logprobs the response must carry (0: the sampled tokens' only); None: none asked."""
        return None


class ChatBody(StrategyBody):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(StrategyBody):
    prompt: str | list[str] = Field(min_length=1)
    echo: Literal[False] = False
    logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_wanted(self) -> int | None:
        return self.logprobs


class ServerOptions(StrictModel):
    budget: Budget | None = None
    kind: Literal["math", "choice", "free"] = "math"
    progress: bool | Literal["deltas"] = False
    include_traces: bool = False


# --------------------------------------------------------------------------------------------- JSON bodies


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
MAX_JSON_DEPTH = 128  # deeper bodies would hit Python's recursion limit later (encoding them upstream)


def json_depth(body: Any) -> int:
    """Nesting depth of parsed JSON (iterative: it must not recurse on the input it measures)."""
    deepest, stack = 0, [(body, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict | list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


def lone_surrogate_at(body: Any) -> str | None:
    """Dotted path of the first string (or key) in `body` that is not valid Unicode (a lone surrogate)."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return path or "(body)"
        elif isinstance(x, dict):
            for k, v in x.items():
                sub = f"{path}.{k}" if path else str(k)
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return path or "(body)"
                stack.append((sub, v))
        elif isinstance(x, list):
            stack.extend((f"{path}.{i}", v) for i, v in enumerate(x))
    return None




def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 saying what is wrong with it (not JSON, nested too deeply,
    a lone surrogate escape naming its field)."""
    try:
        body = json.loads(raw)
    except RecursionError as e:
        raise ApiError(400, "request body is nested too deeply to parse", code="invalid_json") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json")
    if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw):  # rare: only then walk the body
        where = lone_surrogate_at(body)
        if where is not None:
            raise ApiError(400, f"'{where}' holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                           "without its pair), which is not Unicode text", param=where,
                           code="invalid_json")
    return body


def check_stream_options(body: dict[str, Any]) -> None:
    """OpenAI's (and vLLM's) rule for every completion request, passed through or not: `stream_options` only
    with `stream` (a client that sends it otherwise expects a stream it would not get)."""
    if body.get("stream_options") is not None and not body.get("stream"):
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options",
                       code="invalid_value")


# --------------------------------------------------------------------------------------------- responses


SSE_DONE = b"data: [DONE]\n\n"  # a stream's last event, after its answer or after the error that ended it


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n\n"


def usage_dict(u: Usage) -> dict[str, Any]:
    """OpenAI `usage` plus the `ttscale` extension (what the strategy spent)."""
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
        "ttscale": {
            "generated_tokens": u.generated_tokens, "sequential_tokens": u.sequential_tokens,
            "saved_tokens": u.saved_tokens, "unspent_token_cap": u.unspent_token_cap,
            "cached_prompt_tokens": u.cached_prompt_tokens,
            "branches": u.branches, "aborted": u.aborted, "calls": u.calls,
            "wall_time_s": round(u.wall_time_s, 4),
        },
    }


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def chat_logprobs(tokens: list[str], logprobs: list[float], tops: list[dict[str, float]] | None,
                  k: int) -> dict[str, Any]:
    """OpenAI chat `logprobs` (`{"content": [{token, logprob, bytes, top_logprobs}]}`) of one answer."""
    def entry(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8", "replace"))}

    content = []
    for i, (token, lp) in enumerate(zip(tokens, logprobs, strict=False)):
        top = sorted((tops[i] if tops and i < len(tops) else {}).items(), key=lambda kv: -kv[1])[:k]
        content.append({**entry(token, lp), "top_logprobs": [entry(t, v) for t, v in top]})
    return {"content": content}


def completion_logprobs(tokens: list[str], logprobs: list[float], tops: list[dict[str, float]] | None,
                        k: int) -> dict[str, Any]:
    """OpenAI completions `logprobs` (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""
    n = min(len(tokens), len(logprobs))
    offsets, at = [], 0
    for token in tokens[:n]:
        offsets.append(at)
        at += len(token)
    top = None
    if k:
        top = [dict(sorted((tops[i] if tops and i < len(tops) else {}).items(), key=lambda kv: -kv[1])[:k])
               for i in range(n)]
    return {"tokens": tokens[:n], "token_logprobs": logprobs[:n], "top_logprobs": top, "text_offset": offsets}
