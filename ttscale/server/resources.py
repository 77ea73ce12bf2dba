"""Server-side resources a request may pick by name only: ATTS targets and calibrations, DeepPrune judges.

A strategy config field that names a resource (`Strategy.resource_fields`: ATTS `target` is a backend
spec and `calibration_file` a path, DeepPrune `judge` may be `classifier:PATH`) would let a client load a
model, start vLLM or read any file on the server. `ttscale serve --target NAME=SPEC --judge NAME=SPEC
--calibration NAME=PATH` builds them once, at start-up;
a request's value must be one of those names (or a built-in judge, `trained`, `lexical`, `embedding`,
`llm`, that reads no client-given file), and
the strategy is constructed with the built object. Anything else is refused without opening, starting
or probing anything, with a message that does not depend on the value (so it cannot reveal whether a
path exists). The library API (Pipeline, eval CLI) still takes specs and paths.
"""

from __future__ import annotations

import re
from typing import Any

from ttscale.backends.base import Backend
from ttscale.errors import ConfigError
from ttscale.strategies.base import Strategy, StrategyConfig

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
BUILTIN_JUDGES = ("trained", "lexical", "embedding", "llm")
FLAGS = {
    "target": "--target NAME=BACKEND_SPEC",
    "judge": "--judge NAME=classifier:PATH",
    "calibration_file": "--calibration NAME=PATH",
}


class ResourceRefused(Exception):
    """A request named a resource the operator did not: `param` is the request field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


def parse_named(items: list[str], flag: str) -> dict[str, str]:
    """`["NAME=SPEC", ...]` (repeated CLI flags) as a dict; a malformed item or repeated name is an error."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not spec:
            raise ConfigError(f"{flag} takes NAME=SPEC, got {item!r}")
        if name in out:
            raise ConfigError(f"{flag} {name!r} is given twice")
        out[name] = spec
    return out


def check_names(kind: str, named: dict[str, str]) -> None:
    """Operator names: short identifiers; judge names may not shadow a built-in judge."""
    for name in named:
        if not NAME.fullmatch(name):
            raise ConfigError(f"{kind} name {name!r} must be letters, digits, '_', '.', '-' (at most 64)")
        if kind == "judge" and name in BUILTIN_JUDGES:
            raise ConfigError(f"judge name {name!r} is a built-in judge; choose another name")


class ServerResources:
    """The operator's named backends and judges, built once; `resolve` maps a request's names to them."""

    def __init__(
        self,
        targets: dict[str, str] | None = None,
        judges: dict[str, str] | None = None,
        calibrations: dict[str, str] | None = None,
    ):
        from ttscale.backends import make_backend
        from ttscale.judges.pairwise import make_judge

        targets, judges, calibrations = dict(targets or {}), dict(judges or {}), dict(calibrations or {})
        check_names("target", targets)
        check_names("judge", judges)
        check_names("calibration", calibrations)
        for name, spec in judges.items():
            if spec.partition(":")[0] == "llm":
                raise ConfigError(
                    f"judge {name!r}: the llm judge asks the request's own model; requests pick it "
                    "as judge 'llm', it needs no --judge"
                )
        # Judges first: a classifier file is read here, at start-up, so a bad path fails before any model
        # is built. Targets are constructed here and connected or started by the first request using them.
        self.judges: dict[str, Any] = {name: make_judge(spec) for name, spec in judges.items()}
        self.calibrations: dict[str, Any] = {}
        if calibrations:
            from ttscale.strategies.atts import ATTSCalibration

            self.calibrations = {name: ATTSCalibration.load(path) for name, path in calibrations.items()}
        self.targets: dict[str, Backend] = {name: make_backend(spec) for name, spec in targets.items()}

    def pools(self) -> dict[str, dict[str, Any]]:
        return {"target": self.targets, "judge": self.judges, "calibration_file": self.calibrations}

    def resolve(self, cls: type[Strategy], config: StrategyConfig, params: dict[str, str]) -> dict[str, Any]:
        """Constructor keywords carrying the built resources `config` names; `params` maps a config field to
        the request field it came from (for the error). Raises `ResourceRefused`."""
        pools = self.pools()
        kwargs: dict[str, Any] = {}
        for field, keyword in cls.resource_fields.items():
            value = getattr(config, field, None)
            param = params.get(field, f"ttscale.{field}")
            pool = pools.get(field, {})
            if value is None:
                if field == "target":
                    raise ResourceRefused(
                        param, f"strategy {cls.name!r} needs 'ttscale.{field}': " + _choices(field, pool)
                    )
                continue
            if field == "judge" and value in BUILTIN_JUDGES:
                continue
            if value not in pool:
                raise ResourceRefused(
                    param,
                    f"'{param}' must name one of this server's {_noun(field)}s: " + _choices(field, pool),
                )
            kwargs[keyword] = pool[value]
        return kwargs

    async def aclose(self) -> None:
        """Close the target backends (each was started at most once, by the requests that used it)."""
        for be in self.targets.values():
            await be.close()


def _noun(field: str) -> str:
    return {"calibration_file": "calibration"}.get(field, field)


def _choices(field: str, pool: dict[str, Any]) -> str:
    names = ([*BUILTIN_JUDGES] if field == "judge" else []) + sorted(pool)
    listed = ", ".join(names) if names else "none configured"
    return (
        f"{listed} (specs and file paths are not accepted in requests; the operator names them with "
        f"`ttscale serve {FLAGS.get(field, '')}`)"
    )
