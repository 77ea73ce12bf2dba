"""Request building: a strategy request's body, model prefix and `ttscale` object validated into a
`StrategyRun` before anything starts. Each value is traced to the request field it came from, so a 400
names that field (`temperature`, `model` for the prefix, `ttscale.n`, ...); fields naming a server resource
take only the operator's names (server/resources.py) and the run's fan-out must fit the server's limits
(server/limits.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from ttscale.budget import Budget
from ttscale.errors import ConfigError, UnknownNameError
from ttscale.server.errors import ApiError, validation_error
from ttscale.server.forwarding import refused_template_kwargs
from ttscale.server.limits import check_strategy
from ttscale.server.protocol import (
    SERVER_KEYS,
    ChatBody,
    CompletionBody,
    ServerOptions,
    refused_field,
    without_default_fields,
)
from ttscale.server.resources import ResourceRefused
from ttscale.server.runs import StrategyRun
from ttscale.strategies.registry import get_strategy_class, parse_spec
from ttscale.types import Problem

if TYPE_CHECKING:
    from ttscale.server.serving import Serving

# Strategies whose every generation (and verifier score) is one call on the problem's own prompt: on
# /v1/completions they send it raw. The others (PDR and SR refine in conversations, ATTS continues an
# assistant turn, ParScale, Hogwild and ParaThinker build prompts of their own) run on chat only.
RAW_PROMPT_STRATEGIES = frozenset({
    "single", "self-consistency", "weighted-vote", "best-of-n", "ffs", "sync-ffs", "ffs-k", "short-m",
    "last-finish", "deepconf", "deepprune"})


def build_run(serving: Serving, kind: Literal["chat", "completion"], body: dict[str, Any], spec: str | None,
              base_model: str) -> StrategyRun:
    """Validate a strategy request into a run; nothing starts here. Refuses (400, naming the request
    field) a parameter that cannot apply, a config over the fan-out limits and any server resource the
    operator did not name."""
    limits = serving.config
    body = without_default_fields(body)
    if (refused := refused_field(body, serving.refusal_hint)) is not None:
        raise refused
    try:
        parsed: ChatBody | CompletionBody = (ChatBody if kind == "chat" else CompletionBody).model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    if isinstance(parsed, ChatBody) and (refused := refused_template_kwargs(parsed.chat_template_kwargs)):
        raise refused
    ext = dict(parsed.ttscale or {})
    options_raw = {k: ext.pop(k) for k in list(ext) if k in SERVER_KEYS - {"strategy"}}
    try:
        options = ServerOptions(**options_raw)
    except ValidationError as exc:
        raise validation_error(exc, "ttscale.") from exc
    ext_spec = ext.pop("strategy", None)
    if ext_spec is not None and (not isinstance(ext_spec, str) or not ext_spec.strip()):
        raise ApiError(400, "'ttscale.strategy' must be a non-empty strategy spec string (e.g. "
                       "'ffs:n=8')", param="ttscale.strategy", code="invalid_value")
    spec_param = "ttscale.strategy" if ext_spec else "model"
    try:
        if ext_spec and spec and spec != "single" and parse_spec(ext_spec)[0] != parse_spec(spec)[0]:
            raise ApiError(400, f"the model prefix asks for strategy {spec!r} and ttscale.strategy for "
                           f"{ext_spec!r}", param="ttscale.strategy", code="invalid_value")
        name, cfg = parse_spec(ext_spec or spec or "single")
        cls = get_strategy_class(name)
    except UnknownNameError as e:
        raise ApiError(400, str(e), param=spec_param, code="unknown_strategy") from e
    except ConfigError as e:
        raise ApiError(400, str(e), param=spec_param, code="invalid_value") from e
    if kind == "completion" and cls.name not in RAW_PROMPT_STRATEGIES:
        raise ApiError(400, f"strategy {cls.name!r} sends the model more than the request's prompt "
                       "(conversations or prompts of its own), so it cannot take a raw /v1/completions prompt; "
                       "send it to /v1/chat/completions with the prompt as a user message", param=spec_param,
                       code="unsupported_strategy")
    from_body: dict[str, Any] = {}
    params: dict[str, str] = {k: spec_param for k in cfg}  # config field -> request field it came from
    completion_tokens = getattr(parsed, "max_completion_tokens", None)
    max_tokens_field = "max_completion_tokens" if completion_tokens else "max_tokens"
    max_tokens = completion_tokens or parsed.max_tokens
    for key, field, value in (("temperature", "temperature", parsed.temperature),
                              ("top_p", "top_p", parsed.top_p),
                              ("max_tokens", max_tokens_field, max_tokens), ("seed", "seed", parsed.seed),
                              ("top_k", "top_k", None if parsed.top_k in (None, -1) else parsed.top_k)):
        if value is not None:
            from_body[key] = value
            params[key] = field
    params.update({k: f"ttscale.{k}" for k in ext})
    fields = cls.Config.model_fields
    config = {**cfg, **from_body, **ext}
    if "max_tokens" in fields and "max_tokens" not in config:
        config["max_tokens"] = min(fields["max_tokens"].default, limits.max_tokens)
    try:
        validated = cls.Config(**config)
    except ValidationError as exc:
        loc = exc.errors()[0]["loc"]
        raise validation_error(exc, source=params.get(str(loc[0])) if loc else
                                ("ttscale" if ext else spec_param)) from exc
    n = getattr(validated, "n", None)
    if isinstance(n, int) and n > limits.max_n:
        default = "" if "n" in params else f" ({cls.name}'s default)"
        raise ApiError(400, f"'n' ({n} branches{default}) exceeds this server's limit of {limits.max_n}; set it "
                       f"with ttscale.n (or the model prefix, {cls.name}-{limits.max_n}/MODEL)",
                       param=params.get("n", "ttscale.n"), code="invalid_value")
    mt = getattr(validated, "max_tokens", None)
    if isinstance(mt, int) and mt > limits.max_tokens:
        raise ApiError(400, f"'max_tokens' ({mt}) exceeds this server's limit of {limits.max_tokens}",
                       param=params.get("max_tokens", spec_param), code="invalid_value")
    min_tokens = parsed.min_tokens or 0
    if isinstance(mt, int) and min_tokens > mt:
        raise ApiError(400, f"'min_tokens' ({min_tokens}) exceeds the branches' max_tokens ({mt})",
                       param="min_tokens", code="invalid_value")
    over = check_strategy(cls, validated, config, params, spec_param,
                          max_branches=limits.max_branches,
                          max_total_tokens=limits.max_total_tokens)
    if over is not None:
        raise ApiError(400, over.message, param=over.param, code="fan_out_limit")
    options = options.model_copy(update={"budget": request_budget(options.budget, limits.max_total_tokens)})
    try:
        resources = serving.resources.resolve(cls, validated, params)
    except ResourceRefused as e:
        raise ApiError(400, e.message, param=e.param, code="unknown_resource") from e
    strategy = cls(validated, **resources)
    if isinstance(parsed, ChatBody):
        problem = Problem(id="request", messages=parsed.messages, kind=options.kind,
                          choices=["A", "B", "C", "D"] if options.kind == "choice" else None)
    else:
        prompt = parsed.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "strategy requests take one prompt (got a list of "
                               f"{len(prompt)})", param="prompt", code="invalid_value")
            prompt = prompt[0]
        problem = Problem(id="request", prompt=prompt, kind=options.kind,
                          choices=["A", "B", "C", "D"] if options.kind == "choice" else None)
    return StrategyRun(serving, kind, parsed, strategy, options, base_model, problem)

def request_budget(budget: Budget | None, limit: int) -> Budget:
    """The request's budget with `total_tokens` at most the server's `max_total_tokens` (`limit`, also
    its default)."""
    if budget is None:
        return Budget(total_tokens=limit)
    if budget.total_tokens is not None and budget.total_tokens > limit:
        raise ApiError(400, f"'ttscale.budget.total_tokens' ({budget.total_tokens}) exceeds this "
                       f"server's limit of {limit}", param="ttscale.budget.total_tokens",
                       code="invalid_value")
    return budget.model_copy(update={"total_tokens": budget.total_tokens or limit})

