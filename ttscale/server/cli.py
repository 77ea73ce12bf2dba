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
        served_model_name: str | None = typer.Option(
            None, "--served-model-name", help="model name clients use with --backend"),
        max_n: int = typer.Option(64, "--max-n", help="largest n (choices, or a strategy's branches)"),
        max_tokens: int = typer.Option(8192, "--max-tokens", help="largest max_tokens per generation"),
        max_body_bytes: int = typer.Option(2 * 2**20, "--max-body-bytes", help="largest request body"),
        log_level: str = typer.Option("warning", "--log-level"),
        workers: int = typer.Option(
            1, "--workers", min=1, help="proxy processes sharing the port (proxy mode; about one per free core)"),
    ) -> None:
        """Serve strategies behind an OpenAI-compatible API (`STRATEGY-N/MODEL` model names)."""
        import uvicorn

        from ttscale.errors import ConfigError
        from ttscale.server.app import CONFIG_ENV, ServeConfig, create_app

        if bool(upstream) == bool(backend):
            raise ConfigError("give either --upstream URL (proxy) or --backend SPEC (serve it directly), not both")
        be = None
        if backend:
            from ttscale.backends import make_backend

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            be = make_backend(backend)
        config = ServeConfig(upstreams=list(upstream), api_key=api_key, upstream_api_key=upstream_api_key,
                             served_model_name=served_model_name, max_n=max_n, max_tokens=max_tokens,
                             max_body_bytes=max_body_bytes)
        typer.echo(f"ttscale serve on http://{host}:{port}/v1 -> "
                   f"{', '.join(upstream) if upstream else backend}"
                   + (f" ({workers} workers)" if workers > 1 else ""), err=True)
        if workers > 1:
            if be is not None:
                raise ConfigError("--workers needs proxy mode (--upstream): a backend lives in one process")
            os.environ[CONFIG_ENV] = config.model_dump_json()
            uvicorn.run("ttscale.server.app:app_from_env", factory=True, workers=workers, host=host, port=port,
                        log_level=log_level, access_log=False)
            return
        uvicorn.run(create_app(config, backend=be), host=host, port=port, log_level=log_level, access_log=False)
