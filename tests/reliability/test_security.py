"""The proxy a stranger can reach (issue 17, items 1, 9, 12): requests name no server resource, bad input is
a 400 and not a 500, and web pages on other sites cannot use a proxy on localhost.

Real parts: the ttscale proxy under uvicorn on 127.0.0.1 in front of a counting stand-in upstream
(`CountingUpstream`, tests/backends/standins.py); "started nothing" is read from the upstream's request counts,
the proxy's own backends and resources, this process's children, and a FIFO that would show a reader.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import httpx
import numpy as np
import psutil
import pytest

from tests.backends.standins import MODEL, CountingUpstream
from tests.fixtures.real_backends import spawn_process_group, stop_process_group
from tests.fixtures.server import ProxyServer, free_port, running_proxy
from ttscale.errors import ConfigError
from ttscale.judges.pairwise import ClassifierJudge, pair_features, train_classifier
from ttscale.server.app import ServeConfig
from ttscale.server.guards import default_allowed_hosts, host_allowed
from ttscale.server.resources import ServerResources, parse_named
from ttscale.strategies.atts import ATTSCalibration
from ttscale.strategies.registry import strategies

MSGS = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory) -> Path:
    """A real pair classifier trained on a few labelled prefixes, saved where only the operator names it."""
    same = [("we add three and four to get seven", "adding three and four gives seven")] * 4
    diff = [("we add three and four to get seven", "multiply the two numbers to get twelve")] * 4
    X = np.stack([pair_features(a, b) for a, b in same + diff])
    y = np.array([1] * len(same) + [0] * len(diff))
    path = tmp_path_factory.mktemp("judge") / "clf.json"
    train_classifier(X, y, steps=200).save(path)
    return path


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    """An ATTS offline calibration array, as `ATTS.calibrate(...).save(PATH)` writes it."""
    path = tmp_path_factory.mktemp("atts") / "cal.json"
    ATTSCalibration(scores=[1.2, 1.5, 2.0], problem_ids=["c1", "c2", "c3"], draft="d", target="t",
                    step_tokens=500, temperature=0.8).save(path)
    return path


@pytest.fixture(scope="module")
def proxy(upstream, classifier_file, calibration_file) -> Iterator[ProxyServer]:
    """The proxy with one named ATTS target (the stand-in), classifier judge and calibration."""
    config = ServeConfig(
        upstreams=[upstream.url],
        targets={"big": f"openai:{upstream.url}"},
        judges={"clf": f"classifier:{classifier_file}"},
        calibrations={"cal": str(calibration_file)},
    )
    with running_proxy(config) as p:
        yield p


def serving(proxy: ProxyServer):
    return proxy.app.state.ttscale_serving


def snapshot(upstream: CountingUpstream, proxy: ProxyServer) -> dict[str, Any]:
    """Everything a request could have started: upstream requests, proxy backends, child processes."""
    s = serving(proxy)
    return {
        "posts": sum(upstream.posts.values()),
        "backends": sorted(s._backends),
        "targets": dict(s.resources.targets),
        "judges": dict(s.resources.judges),
        "children": len(psutil.Process().children(recursive=True)),
    }


def ask(client: httpx.Client, model: str, ext: dict[str, Any], **kw: Any) -> httpx.Response:
    """POST a chat request for `model` with `ext` as its `ttscale` extension."""
    return client.post("/v1/chat/completions", json={"model": model, "messages": MSGS, "ttscale": ext}, **kw)


def error(r: httpx.Response) -> dict[str, Any]:
    return r.json()["error"]


# ------------------------------------------------------------------------------ item 1: named resources


@pytest.mark.parametrize(
    "target",
    [
        "engine",
        "vllm:/tmp/no-such-model",
        f"openai:http://127.0.0.1:{free_port()}",
        "http://127.0.0.1:9/v1",
        "replay:/tmp/bank.jsonl",
    ],
)
def test_a_target_spec_in_a_request_is_refused_and_starts_nothing(client, upstream, proxy, target):
    before = snapshot(upstream, proxy)
    engine_loaded = "ttscale.backends.engine.backend" in sys.modules
    r = ask(client, f"atts/{MODEL}", {"target": target, "samples": 1, "turns": 1})
    assert r.status_code == 400
    e = error(r)
    assert e["param"] == "ttscale.target" and e["code"] == "unknown_resource"
    assert "big" in e["message"] and target not in e["message"]
    assert snapshot(upstream, proxy) == before
    assert engine_loaded or "ttscale.backends.engine.backend" not in sys.modules


@pytest.mark.parametrize(("model", "ext", "param"), [
    (f"atts:target=engine,samples=1,turns=1/{MODEL}", {}, "model"),
    (MODEL, {"strategy": "atts:target=engine,samples=1,turns=1"}, "ttscale.strategy"),
    (f"deepprune:n=2,judge=classifier:/dev/zero/{MODEL}", {}, "model"),
])
def test_resource_specs_inside_strategy_specs_are_refused_too(client, upstream, proxy, model, ext, param):
    before = snapshot(upstream, proxy)
    r = ask(client, model, ext)
    assert r.status_code == 400 and error(r)["param"] == param and error(r)["code"] == "unknown_resource"
    assert snapshot(upstream, proxy) == before


def test_atts_without_a_target_names_the_servers_targets(client, upstream, proxy):
    before = snapshot(upstream, proxy)
    r = ask(client, f"atts/{MODEL}", {"samples": 1, "turns": 1})
    assert r.status_code == 400 and error(r)["param"] == "ttscale.target" and "big" in error(r)["message"]
    assert snapshot(upstream, proxy) == before


def test_a_named_target_is_the_operators_backend(proxy):
    s = serving(proxy)
    run = s.build_run(
        "chat",
        {"model": f"atts/{MODEL}", "messages": MSGS, "ttscale": {"target": "big", "samples": 1, "turns": 1}},
        "atts",
        MODEL,
    )
    assert run.strategy.target() is s.resources.targets["big"]


def test_a_calibration_path_is_refused_and_a_named_one_used(client, upstream, proxy, calibration_file):
    before = snapshot(upstream, proxy)
    answers = []
    for path in (calibration_file, "/no/such/file.json"):
        ext = {"target": "big", "samples": 1, "turns": 1, "calibration": "offline", "calibration_file": str(path)}
        r = ask(client, f"atts/{MODEL}", ext)
        answers.append((r.status_code, r.json()))
    assert answers[0][0] == 400 and answers[0] == answers[1]
    assert answers[0][1]["error"]["param"] == "ttscale.calibration_file"
    assert snapshot(upstream, proxy) == before
    s = serving(proxy)
    ext = {"target": "big", "samples": 1, "turns": 1, "calibration": "offline", "calibration_file": "cal"}
    run = s.build_run("chat", {"model": f"atts/{MODEL}", "messages": MSGS, "ttscale": ext}, "atts", MODEL)
    assert run.strategy.offline is s.resources.calibrations["cal"]
    assert run.strategy.offline.scores == [1.2, 1.5, 2.0]


def test_classifier_path_in_a_request_is_never_opened(client, upstream, proxy, tmp_path):
    """A FIFO shows whether anyone opened it for reading: a writer's non-blocking open fails with ENXIO
    while there is no reader. The request must come back at once (opening it would block) and leave no
    reader."""
    fifo = tmp_path / "judge.fifo"
    os.mkfifo(fifo)
    before = snapshot(upstream, proxy)
    r = ask(client, f"deepprune/{MODEL}", {"judge": f"classifier:{fifo}", "n": 2}, timeout=10)
    assert r.status_code == 400 and error(r)["param"] == "ttscale.judge"
    with pytest.raises(OSError) as no_reader:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert no_reader.value.errno == errno.ENXIO
    assert snapshot(upstream, proxy) == before


def test_refusals_do_not_reveal_whether_a_path_exists(client, classifier_file, tmp_path):
    answers = []
    for path in (classifier_file, tmp_path / "missing.json", Path("/dev/zero")):
        r = ask(client, f"deepprune/{MODEL}", {"judge": f"classifier:{path}", "n": 2})
        answers.append((r.status_code, r.json()))
    assert answers[0][0] == 400 and answers[0] == answers[1] == answers[2]


def test_a_named_judge_is_used_and_builtins_stay_allowed(client, upstream, proxy):
    for judge, name in (("clf", "classifier"), ("lexical", "lexical")):
        posted = upstream.posts["/v1/chat/completions"]
        r = ask(client, f"deepprune/{MODEL}", {"judge": judge, "n": 3, "k3": 3})
        assert r.status_code == 200, r.text
        assert r.json()["ttscale"]["decision"]["judge"] == name
        assert r.json()["ttscale"]["answer"] == "7"
        assert upstream.posts["/v1/chat/completions"] - posted == 3
    assert isinstance(serving(proxy).resources.judges["clf"], ClassifierJudge)


def test_operator_resource_names_are_checked_at_start_up(classifier_file, tmp_path):
    assert parse_named(["a=engine", "b = openai:http://x"], "--target") == {
        "a": "engine",
        "b": "openai:http://x",
    }
    for items in (["engine"], ["a="], ["a=engine", "a=vllm"]):
        with pytest.raises(ConfigError, match="--target"):
            parse_named(items, "--target")
    with pytest.raises(ConfigError, match="built-in"):
        ServerResources(judges={"lexical": f"classifier:{classifier_file}"})
    with pytest.raises(ConfigError, match="llm"):
        ServerResources(judges={"asker": "llm"})
    with pytest.raises(ConfigError, match="must be letters"):
        ServerResources(targets={"a/b": "engine"})
    with pytest.raises(ConfigError):  # the operator's own file is read at start-up: a bad one fails there
        ServerResources(judges={"clf": f"classifier:{tmp_path / 'missing.json'}"})


# Text the model reads (prompts, stop strings): never opened, loaded or started by the server.
FREE_TEXT = {
    "system_prompt",
    "check_prompt",
    "final_prompt",
    "collab_prompt",
    "summary_prefix",
    "summary_prompt",
    "prompt_template",
    "stop",
    "step_stop",
}


def _is_free_string(annotation: Any) -> bool:
    args = get_args(annotation)
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return False
    return any(_is_free_string(a) for a in args if a is not type(None))


def test_every_string_config_field_is_free_text_or_a_declared_resource():
    """A new config field taking a free string (a spec, a path) must be declared in `resource_fields`
    so the server resolves it from operator names; prompt texts are the only exception."""
    for name, cls in strategies().items():
        for field, info in cls.Config.model_fields.items():
            if not _is_free_string(info.annotation) or field in cls.resource_fields:
                continue
            assert field in FREE_TEXT, (
                f"{name}.{field} takes a free string: declare it in {cls.__name__}.resource_fields or add "
                "it to FREE_TEXT if it is only text for the model"
            )


# ------------------------------------------------------------------------------ item 9: 400, not 500


@pytest.mark.parametrize("model", [MODEL, f"sc-2/{MODEL}"])
@pytest.mark.parametrize("depth", [200, 5000, 100_000])
def test_deeply_nested_json_is_a_400(client, upstream, model, depth):
    posted = sum(upstream.posts.values())
    raw = (
        b'{"model":"%s","messages":[{"role":"user","content":' % model.encode()
        + b"[" * depth
        + b"]" * depth
        + b"}]}"
    )
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and error(r)["code"] == "invalid_json"
    assert "nested" in error(r)["message"]
    assert sum(upstream.posts.values()) == posted


@pytest.mark.parametrize("model", [MODEL, f"sc-2/{MODEL}"])
def test_a_lone_surrogate_is_a_400_naming_the_field(client, upstream, model):
    posted = sum(upstream.posts.values())
    raw = b'{"model":"%s","messages":[{"role":"user","content":"abc \\ud800 def"}]}' % model.encode()
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert error(r)["param"] == "messages.0.content" and "surrogate" in error(r)["message"]
    assert sum(upstream.posts.values()) == posted


def test_a_surrogate_pair_is_fine(client):
    raw = (
        b'{"model":"sc-1/%s","messages":[{"role":"user","content":"emoji \\ud83d\\ude00"}]}' % MODEL.encode()
    )
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------ item 12: smaller


@pytest.mark.parametrize("strategy", ["", "   "])
def test_an_empty_strategy_is_a_400(client, upstream, strategy):
    posted = sum(upstream.posts.values())
    r = ask(client, MODEL, {"strategy": strategy})
    assert r.status_code == 400 and error(r)["param"] == "ttscale.strategy"
    assert sum(upstream.posts.values()) == posted


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        ("sc:n=abc/" + MODEL, {}, "model"),
        ("sc/" + MODEL, {"ttscale": {"n": "abc"}}, "ttscale.n"),
        ("sc/" + MODEL, {"ttscale": {"wat": 1}}, "ttscale.wat"),
        ("pdr/" + MODEL, {"ttscale": {"schedule": [2, 0, 1]}}, "ttscale.schedule"),
        ("sc/" + MODEL, {"ttscale": {"budget": {"total_tokens": 0}}}, "ttscale.budget.total_tokens"),
        ("sc/" + MODEL, {"temperature": 9}, "temperature"),
        ("sc/" + MODEL, {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("sc/" + MODEL, {"frequency_penalty": 3.0}, "frequency_penalty"),  # forwarded, but out of range
        ("sc/" + MODEL, {"tools": [{"type": "function"}]}, "tools"),  # cannot apply to a vote
        ("sc-2000/" + MODEL, {}, "model"),
        ("sc/" + MODEL, {"ttscale": {"n": 2000}}, "ttscale.n"),
        ("sc:max_tokens=99999/" + MODEL, {}, "model"),
        (MODEL, {"ttscale": {"strategy": "nope"}}, "ttscale.strategy"),
        ("ffs-k/" + MODEL, {"ttscale": {"strategy": "sc"}}, "ttscale.strategy"),
    ],
)
def test_validation_errors_name_the_request_field(client, upstream, model, body, param):
    posted = sum(upstream.posts.values())
    r = client.post("/v1/chat/completions", json={"model": model, "messages": MSGS, **body})
    assert r.status_code == 400, r.text
    assert error(r)["param"] == param, error(r)
    assert sum(upstream.posts.values()) == posted


def test_a_foreign_host_is_refused(client, upstream):
    posted = sum(upstream.posts.values())
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example"):
        r = client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": MSGS}, headers={"host": host}
        )
        assert r.status_code == 400 and error(r)["code"] == "host_not_allowed"
        assert client.get("/v1/models", headers={"host": host}).status_code == 400
    assert sum(upstream.posts.values()) == posted
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80"):
        assert client.get("/v1/models", headers={"host": host}).status_code == 200


def test_allowed_hosts_defaults_follow_the_bind_address():
    assert "*" not in default_allowed_hosts("127.0.0.1") and "localhost" in default_allowed_hosts("::1")
    assert default_allowed_hosts("0.0.0.0") == ["*"]
    assert host_allowed("api.example.com:443", ["*.example.com"]) and not host_allowed(
        "example.org", ["x.org"]
    )
    assert host_allowed("[::1]:8080", ["::1"]) and not host_allowed(None, ["localhost"])


def test_a_cross_site_text_plain_post_does_not_execute(client, upstream):
    """What a page on another site can send without a CORS preflight: a `text/plain` form-like POST."""
    posted = sum(upstream.posts.values())
    body = json.dumps({"model": f"sc-4/{MODEL}", "messages": MSGS})
    r = client.post(
        "/v1/chat/completions",
        content=body,
        headers={"origin": "https://evil.example", "content-type": "text/plain"},
    )
    assert r.status_code == 403 and error(r)["code"] == "origin_not_allowed"
    assert sum(upstream.posts.values()) == posted
    same = client.post(
        "/v1/chat/completions",
        content=body,
        headers={"origin": str(client.base_url).rstrip("/"), "content-type": "application/json"},
    )
    assert same.status_code == 200, same.text


def test_allowed_origins_get_cors_and_others_do_not(upstream):
    config = ServeConfig(upstreams=[upstream.url], allowed_origins=["https://app.example.com"])
    with running_proxy(config) as p, httpx.Client(base_url=p.url, timeout=30) as c:
        pre = c.options(
            "/v1/chat/completions",
            headers={
                "origin": "https://app.example.com",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example.com"
        ok = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": MSGS},
            headers={"origin": "https://app.example.com"},
        )
        assert (
            ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example.com"
        )
        bad = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": MSGS},
            headers={"origin": "https://evil.example"},
        )
        assert bad.status_code == 403


# ------------------------------------------------------------------------------ the CLI


def test_serve_cli_wires_names_limits_and_hosts(upstream, classifier_file):
    """`ttscale serve` as a user starts it: flags reach the server (named judge works, a path does not,
    the fan-out limit holds, a foreign Host is refused)."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("ttscale")),
        "serve",
        "--upstream",
        upstream.url,
        "--port",
        str(port),
        "--judge",
        f"clf=classifier:{classifier_file}",
        "--target",
        f"big=openai:{upstream.url}",
        "--max-branches",
        "6",
        "--max-total-tokens",
        "100000",
    ]
    proc = spawn_process_group(  # ends with this test process, even when it is killed
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "serve exited"
            assert time.monotonic() < deadline, "ttscale serve did not come up"
            time.sleep(0.1)  # polling the server's readiness, bounded by the deadline
        with httpx.Client(base_url=base, timeout=30) as c:
            ok = ask(c, f"deepprune/{MODEL}", {"judge": "clf", "n": 3, "k3": 3})
            assert ok.status_code == 200, ok.text
            path = ask(c, f"deepprune/{MODEL}", {"judge": f"classifier:{classifier_file}", "n": 3})
            assert path.status_code == 400 and error(path)["param"] == "ttscale.judge"
            wide = c.post("/v1/chat/completions", json={"model": f"sc-7/{MODEL}", "messages": MSGS})
            assert wide.status_code == 400 and error(wide)["code"] == "fan_out_limit"
            assert c.get("/v1/models", headers={"host": "evil.example"}).status_code == 400
    finally:
        stop_process_group(proc, timeout_s=20)


def test_serve_help_lists_the_new_flags():
    out = subprocess.run(
        [str(Path(sys.executable).with_name("ttscale")), "serve", "--help"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=60,
    )
    for flag in (
        "--target",
        "--judge",
        "--calibration",
        "--max-branches",
        "--max-total-tokens",
        "--allowed-hosts",
        "--allowed-origins",
    ):
        assert flag in out.stdout


def test_named_targets_are_closed_with_the_server(upstream):
    """The operator's backends live as long as the server: its shutdown closes them."""
    with running_proxy(ServeConfig(upstreams=[upstream.url], targets={"big": f"openai:{upstream.url}"})) as p:
        target = serving(p).resources.targets["big"]
        assert not target._client.is_closed
    assert target._client.is_closed
