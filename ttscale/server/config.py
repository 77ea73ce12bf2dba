"""The proxy's configuration: what the operator of `ttscale serve` chooses (upstreams, limits, named resources)."""

from __future__ import annotations

from pydantic import Field

from ttscale.types import StrictModel

STATE_KEY = "ttscale_serving"  # the attribute of `app.state` that holds the `Serving` the routes use
CONFIG_ENV = "TTSCALE_SERVE_CONFIG"  # the ServeConfig (JSON) of each worker process of `ttscale serve --workers`


class ServeConfig(StrictModel):
    """Server limits and wiring. `upstreams` (proxy mode) or a backend passed to `Serving` is required."""

    upstreams: list[str] = Field(default_factory=list, description="OpenAI-compatible base URLs of one model set")
    upstream_api_key: str | None = Field(None, description="bearer token sent to the upstream(s)")
    api_key: str | list[str] | None = Field(
        None, description="clients must send `Authorization: Bearer <api_key>` (one of them, given several)")
    served_model_name: str | None = Field(None, description="model name when serving a backend directly")
    max_n: int = Field(64, ge=1, description="largest `n` (OpenAI choices, or a strategy's branch count)")
    max_tokens: int = Field(8192, ge=1, description="largest `max_tokens` per generation")
    max_body_bytes: int = Field(2 * 2**20, ge=1024, description="largest request body")
    max_branches: int = Field(256, ge=1, description="most upstream calls (generations and scoring) one "
                              "request may start, over all its strategy's fields; pass-through: prompts x n")
    max_total_tokens: int = Field(2**20, ge=1, description="most tokens one request may generate (checked "
                                  "from its config before it starts, and the default budget of its Context)")
    targets: dict[str, str] = Field(default_factory=dict, description="ATTS target backends a request may "
                                    "name: NAME -> backend spec (requests never give specs)")
    judges: dict[str, str] = Field(default_factory=dict, description="DeepPrune judges a request may name "
                                   "besides the built-in ones: NAME -> judge spec (classifier:PATH)")
    calibrations: dict[str, str] = Field(default_factory=dict, description="ATTS offline calibration files a "
                                         "request may name as `calibration_file`: NAME -> PATH")
    allowed_hosts: list[str] = Field(["localhost", "127.0.0.1", "[::1]"], description="Host header names "
                                     "served (`*` = any, `*.example.com`); the CLI allows any off loopback")
    allowed_origins: list[str] = Field(default_factory=list, description="web origins whose pages may call "
                                       "the server (CORS); a request with another foreign Origin is refused")
    upstream_timeout_s: float = Field(600.0, gt=0, description="longest one upstream request may take in all")
    upstream_connect_timeout_s: float = Field(5.0, gt=0, description="TCP connect to an upstream")
    upstream_first_token_timeout_s: float = Field(
        300.0, gt=0, description="request sent until the upstream's first streamed chunk (a non-streamed "
        "answer: all of it)")
    upstream_idle_timeout_s: float = Field(120.0, gt=0, description="longest silence between streamed chunks")
    upstream_probe_timeout_s: float = Field(
        5.0, gt=0, description="how long /health and model-name lookups wait for an upstream's /v1/models")
    upstream_retries: int = Field(1, ge=0, description="retries of a strategy branch's upstream call")
    max_connections: int = Field(1024, ge=1, description="pooled upstream connections")

