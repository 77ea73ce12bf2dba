"""One spec grammar for strategies, backends and judges: `NAME[:ITEM[,ITEM...]]`.

An ITEM is `key=value` (an option) or a bare value (a positional argument: a backend's URLs or model path,
a judge's model file); positional values come before the options. A value is

- `"..."`: a JSON string, for any text (commas, quotes, `/`, `=`, `\\n`, unicode);
- `'...'`: the text between single quotes (`\\'` and `\\\\` escape a quote and a backslash);
- `[...]` or `{...}`: JSON (a list or an object), else the text up to the next comma after the closing
  bracket (commas inside the brackets do not split);
- anything else, up to the next comma: JSON when it reads as JSON (`8`, `0.5`, `true`, `null`), else the
  text itself (`mode=sync`, `judge=classifier:/models/j.json`).

A piece without `key=` that follows an option's bare value continues that value, so a hand-typed
`ffs:n=8,system_prompt=Think, then answer.` keeps its comma. Keys may use `-` for `_` (`max-tokens=64`).
`format_spec` quotes whatever needs quoting, so `parse_spec(format_spec(s)) == s` for every `Spec`
(tests/strategies/test_spec_grammar.py checks it with hypothesis). A strategy spec may lead a proxy model
name (`ffs:n=8/MODEL`); `split_model_name` finds the `/` that ends it, outside quotes and brackets.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ttscale.errors import ConfigError

_KEY = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=")
_OPTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[^:,/\s](?:[^:,/]*[^:,/\s])?")
# Characters that make a bare string value ambiguous, wherever they are in it.
_ALWAYS_QUOTED = ',"\\'
_JSON = json.JSONDecoder()


class Spec(BaseModel):
    """A parsed spec: the name, positional values, then options in the order given."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    args: tuple[Any, ...] = ()
    options: dict[str, Any] = {}


def parse_spec(text: str, what: str = "spec") -> Spec:
    """Parse `NAME[:ITEM,...]` (see the module docstring); `what` names it in errors ("strategy spec")."""
    spec, _ = parse_spec_until(text, "", what)
    return spec


def parse_spec_until(text: str, stop: str, what: str = "spec") -> tuple[Spec, str]:
    """Parse the spec that starts `text`, up to the first `stop` character outside quoted and bracketed
    values: (spec, the rest of `text` from that character on, or "" when there is none)."""
    if not isinstance(text, str):
        raise ConfigError(f"a {what} must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise ConfigError(f"empty {what}")
    name_end = len(stripped)
    for i, ch in enumerate(stripped):
        if ch == ":" or ch in stop:
            name_end = i
            break
    name = stripped[:name_end].strip()
    if not name:
        raise ConfigError(f"bad {what} {text!r}: no name before {stripped[name_end:name_end + 1]!r}")
    if name_end < len(stripped) and stripped[name_end] == ":":
        args, options, end = _parse_body(stripped[name_end + 1:], text, what, until=stop)
        rest = stripped[name_end + 1 + end:]
    else:
        args, options, rest = [], {}, stripped[name_end:]
    return Spec(name=name, args=tuple(args), options=options), rest


def format_spec(spec: Spec, *, also_quote: str = "") -> str:
    """The text `parse_spec` reads back as `spec`. String values holding any of `also_quote` are quoted too
    (strategies quote `/` so a spec can lead a proxy model name; backends quote `?`, their old option mark)."""
    items = [format_value(a, positional=True, also_quote=also_quote) for a in spec.args]
    if not _NAME.fullmatch(spec.name):
        raise ConfigError(f"{spec.name!r} is not a spec name (no ':', ',' or '/', nor spaces at its ends)")
    for key, value in spec.options.items():
        if not _OPTION.fullmatch(key):
            raise ConfigError(f"{key!r} is not a spec option name (a letter or '_', then letters, digits, '_')")
        items.append(f"{key}={format_value(value, also_quote=also_quote)}")
    return spec.name + (":" + ",".join(items) if items else "")


def format_value(value: Any, *, positional: bool = False, also_quote: str = "") -> str:
    """One value as spec text: bare where it reads back unchanged, else quoted or JSON."""
    if isinstance(value, str):
        return value if _bare_ok(value, positional, also_quote) else json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value, ensure_ascii=False)
        except TypeError as exc:
            raise ConfigError(f"cannot write {value!r} in a spec: {exc}") from exc
    raise ConfigError(f"cannot write a {type(value).__name__} value ({value!r}) in a spec")


def split_model_name(model: str) -> tuple[str, str] | None:
    """(strategy spec, base model) of a proxy model name `SPEC/MODEL`, split at the first `/` outside quoted
    and bracketed values (at the first `/` when the text before it is no spec, so that parsing the prefix
    names the problem); None when there is no `/` with text on both sides."""
    stripped = model.strip()
    try:
        _, rest = parse_spec_until(stripped, "/", "strategy spec")
    except ConfigError:
        rest = stripped[stripped.find("/"):] if "/" in stripped else ""
    prefix = stripped[:len(stripped) - len(rest)]
    if not rest.startswith("/") or len(rest) < 2 or not prefix.strip():
        return None
    return prefix, rest[1:]


# ---------------------------------------------------------------- the parser


def _parse_body(body: str, text: str, what: str, until: str = "") -> tuple[list[Any], dict[str, Any], int]:
    """Items of `body` up to its end (or the first top-level `until` character): (args, options, stop)."""
    args: list[Any] = []
    options: dict[str, Any] = {}
    last_key: str | None = None
    last_bare: int | None = None  # where the last option's bare value starts, for a continuation
    pos = 0
    while True:
        key_match = _KEY.match(body, pos)
        start = key_match.end() if key_match else pos
        value, end, bare = _value_at(body, start, text, what, until)
        if key_match is None:
            piece = body[pos:end].strip()
            if piece and last_bare is not None and last_key is not None:
                options[last_key] = _bare(body[last_bare:end].strip())
            elif piece and options:
                raise ConfigError(f"bad {what} {text!r}: {piece!r} is not key=value (positional values "
                                  "go before the options; quote a value that holds a comma)")
            elif piece:
                args.append(value)
        else:
            key = key_match.group(1).replace("-", "_")
            if key in options:
                raise ConfigError(f"bad {what} {text!r}: {key!r} is given twice")
            options[key] = value
            last_key, last_bare = key, (_skip_space(body, start) if bare else None)
        if end >= len(body) or body[end] != ",":
            return args, options, end
        pos = end + 1


def _skip_space(body: str, pos: int) -> int:
    while pos < len(body) and body[pos].isspace():
        pos += 1
    return pos


def _value_at(body: str, pos: int, text: str, what: str, until: str) -> tuple[Any, int, bool]:
    """The value starting at `pos`: (value, index of the ',' / `until` / end after it, was it bare text)."""
    pos = _skip_space(body, pos)
    first = body[pos:pos + 1]
    if first in ('"', "'"):
        if first == '"':
            try:
                value, end = _JSON.raw_decode(body, pos)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"bad {what} {text!r}: the quoted value at {body[pos:pos + 20]!r} is "
                                  f"not closed or has a bad escape ({exc.msg})") from exc
        else:
            value, end = _single_quoted(body, pos, text, what)
        end = _skip_space(body, end)
        if end < len(body) and body[end] != "," and body[end] not in until:
            raise ConfigError(f"bad {what} {text!r}: {body[end:end + 20]!r} follows a quoted value; "
                              "put a comma between items")
        return value, end, False
    if first in ("[", "{"):
        close = _bracket_end(body, pos, text, what)
        end = _next_stop(body, close, until)
        raw = body[pos:end].strip()
        try:
            return json.loads(raw), end, False
        except json.JSONDecodeError:
            return raw, end, True  # text in brackets, such as a prompt starting with `{names}`
    end = _next_stop(body, pos, until)
    return _bare(body[pos:end].strip()), end, True


def _next_stop(body: str, pos: int, until: str) -> int:
    while pos < len(body) and body[pos] != "," and body[pos] not in until:
        pos += 1
    return pos


def _single_quoted(body: str, pos: int, text: str, what: str) -> tuple[str, int]:
    out, i = [], pos + 1
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] in "'\\":
            out.append(body[i + 1])
            i += 2
        elif ch == "'":
            return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    raise ConfigError(f"bad {what} {text!r}: the value quoted at {body[pos:pos + 20]!r} is not closed")


def _bracket_end(body: str, pos: int, text: str, what: str) -> int:
    """Index just past the bracket that closes the one at `pos` (JSON strings inside are skipped)."""
    depth, i = 0, pos
    while i < len(body):
        ch = body[i]
        if ch == '"':
            try:
                _, i = _JSON.raw_decode(body, i)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"bad {what} {text!r}: a string in {body[pos:pos + 30]!r} is not "
                                  "closed") from exc
            continue
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ConfigError(f"bad {what} {text!r}: the {body[pos]!r} of {body[pos:pos + 30]!r} is not closed")


def _bare(raw: str) -> Any:
    """A bare value: JSON when it reads as JSON (numbers, true/false, null), else the text."""
    if not raw:
        return ""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _bare_ok(s: str, positional: bool, also_quote: str) -> bool:
    """Whether `s` written bare reads back as the same string."""
    if not s or s != s.strip() or s[0] in "\"'[{":
        return False
    if any(c in _ALWAYS_QUOTED or c in also_quote or unicodedata.category(c)[0] == "C" for c in s):
        return False
    if positional and _KEY.match(s):
        return False
    try:
        json.loads(s)
    except ValueError:
        return True
    return False
