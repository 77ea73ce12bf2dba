"""`ttscale serve`: the OpenAI-compatible proxy (or a backend served directly) under uvicorn."""

from __future__ import annotations

import os

import typer


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the `ttscale` CLI."""

    @app.command()
    def serve(
        upstream: list[str] = typer.Option(
            [], "--upstream", "-u", help="OpenAI-compatible base URL (repeat for replicas of one model set)"),
        backend: str | None = typer.Option(
            None, "--backend", "-b", help="serve a backend directly instead: engine[:PATH] | vllm[:PATH] | ..."),
        host: str = typer.Option("127.0.0.1", "--host", help="bind address (loopback unless told otherwise)"),
        port: int = typer.Option(8080, "--port"),
        api_key: str | None = typer.Option(
            None, "--api-key", envvar="TTSCALE_API_KEY", help="require 'Authorization: Bearer KEY'"),
        upstream_api_key: str | None = typer.Option(
            None, "--upstream-api-key", envvar="TTSCALE_UPSTREAM_API_KEY", help="bearer token for the upstream(s)"),
        upstream_connect_timeout: float = typer.Option(
            5.0, "--upstream-connect-timeout", min=0.001, help="seconds to connect to an upstream"),
        upstream_first_token_timeout: float = typer.Option(
            300.0, "--upstream-first-token-timeout", min=0.001, help="seconds from sending a request to the "
            "upstream's first streamed chunk (a non-streamed answer: all of it); past it: 504"),
        upstream_idle_timeout: float = typer.Option(
            120.0, "--upstream-idle-timeout", min=0.001, help="longest silence between streamed chunks (s); "
            "past it the stream ends with an upstream_timeout error"),
        upstream_timeout: float = typer.Option(
            600.0, "--upstream-timeout", min=0.001, help="longest one upstream request may take in total (s)"),
        shutdown_timeout: float = typer.Option(
            30.0, "--shutdown-timeout", min=0.0, help="on SIGTERM: seconds to let in-flight requests finish "
            "before they are cancelled (their upstream work aborted) and the server exits"),
        served_model_name: str | None = typer.Option(
            None, "--served-model-name", help="model name clients use with --backend"),
        max_n: int = typer.Option(64, "--max-n", help="largest n (choices, or a strategy's branches)"),
        max_tokens: int = typer.Option(8192, "--max-tokens", help="largest max_tokens per generation"),
        max_body_bytes: int = typer.Option(2 * 2**20, "--max-body-bytes", help="largest request body"),
        max_branches: int = typer.Option(
            256, "--max-branches", min=1, help="most upstream calls one request may start, over all its "
            "strategy's fields (ATTS samples x turns x 3, PDR's schedule, ...); pass-through: prompts x n"),
        max_total_tokens: int = typer.Option(
            2**20, "--max-total-tokens", min=1, help="most tokens one request may generate (checked before "
            "it starts; also its default budget)"),
        target: list[str] = typer.Option(
            [], "--target", help="NAME=BACKEND_SPEC an ATTS request may name as its target (repeat); "
            "requests never give backend specs"),
        judge: list[str] = typer.Option(
            [], "--judge", help="NAME=classifier:PATH a DeepPrune request may name as its judge (repeat); "
            "trained, lexical, embedding and llm need none"),
        calibration: list[str] = typer.Option(
            [], "--calibration", help="NAME=PATH of an ATTS offline calibration a request may name as its "
            "calibration_file (repeat)"),
        allowed_hosts: list[str] = typer.Option(
            [], "--allowed-hosts", help="Host header names served (repeat; '*' = any, '*.example.com'); "
            "default: the loopback names when bound to loopback, any otherwise"),
        allowed_origins: list[str] = typer.Option(
            [], "--allowed-origins", help="web origins whose pages may call the API, e.g. "
            "https://app.example.com (repeat; CORS); other browser origins get 403"),
        log_level: str = typer.Option("warning", "--log-level"),
        workers: int = typer.Option(
            1, "--workers", min=1, help="proxy processes sharing the port (proxy mode; about one per free core)"),
    ) -> None:
        """Serve strategies behind an OpenAI-compatible API (`STRATEGY-N/MODEL` model names)."""
        import uvicorn

        from ttscale.errors import ConfigError
        from ttscale.server.app import CONFIG_ENV, ServeConfig, create_app
        from ttscale.server.guards import default_allowed_hosts
        from ttscale.server.resources import parse_named

        if bool(upstream) == bool(backend):
            raise ConfigError("give either --upstream URL (proxy) or --backend SPEC (serve it directly), not both")
        be = None
        if backend:
            from ttscale.backends import make_backend

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            be = make_backend(backend)
        config = ServeConfig(upstreams=list(upstream), api_key=api_key, upstream_api_key=upstream_api_key,
                             upstream_connect_timeout_s=upstream_connect_timeout,
                             upstream_first_token_timeout_s=upstream_first_token_timeout,
                             upstream_idle_timeout_s=upstream_idle_timeout, upstream_timeout_s=upstream_timeout,
                             served_model_name=served_model_name, max_n=max_n, max_tokens=max_tokens,
                             max_body_bytes=max_body_bytes, max_branches=max_branches,
                             max_total_tokens=max_total_tokens, targets=parse_named(target, "--target"),
                             judges=parse_named(judge, "--judge"),
                             calibrations=parse_named(calibration, "--calibration"),
                             allowed_hosts=list(allowed_hosts) or default_allowed_hosts(host),
                             allowed_origins=list(allowed_origins))
        typer.echo(f"ttscale serve on http://{host}:{port}/v1 -> "
                   f"{', '.join(upstream) if upstream else backend}"
                   + (f" ({workers} workers)" if workers > 1 else ""), err=True)
        if workers > 1:
            if be is not None:
                raise ConfigError("--workers needs proxy mode (--upstream): a backend lives in one process")
            os.environ[CONFIG_ENV] = config.model_dump_json()
            import tempfile

            # uvicorn annotates timeout_graceful_shutdown as int but hands it to asyncio.timeout, which takes
            # float seconds: the two ignores below are for that annotation.
            with tempfile.TemporaryDirectory(prefix="ttscale-metrics-") as metrics_dir:
                # /metrics answers for all workers together (prometheus-client's multiprocess mode)
                os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
                uvicorn.run("ttscale.server.app:app_from_env", factory=True, workers=workers, host=host,
                            port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout)  # type: ignore[arg-type]
            return
        uvicorn.run(create_app(config, backend=be), host=host, port=port, log_level=log_level, access_log=False,
                    timeout_graceful_shutdown=shutdown_timeout)  # type: ignore[arg-type]
