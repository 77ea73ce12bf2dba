"""Datasets by name, all turned into `Problem`s of one JSONL schema (docs/datasets.md).

Sources, tried in this order for a name:

- a path to a `.jsonl` or `.parquet` file (any name that is an existing file). Rows may be in our schema
  or raw Hugging Face rows of the usual sets (MATH-500, AIME, GSM8K, GPQA; see `ROW_FORMATS`); a row
  without an id gets a stable derived one;
- `smoke`: a tiny set shipped inside the package (`ttscale/evals/data/smoke.jsonl`);
- reasoning-gym tasks (`gsm-symbolic`, `basic-arithmetic`, `chain-sum`, ... or `rg:<task>`), generated
  offline from a seed, graded with reasoning-gym's own scorer as well as math-verify;
- `champ` / `champ-dataset`: the CHAMP competition-math set from the installed `champ_dataset` package;
- the named benchmark sets (`aime24`, `aime25`, `math500`, `gpqa-diamond`, `gsm8k`): a local file
  `<name>.jsonl` (or `.parquet`) in `--data-dir`, `$TTSCALE_DATA` or `~/.cache/ttscale/data`, else the
  Hugging Face hub when it is reachable (the converted file is cached there for next time). Offline, the
  error says how to supply the file.

Multiple-choice problems (`kind: choice`) have their options shuffled under a seed (per problem), rendered
into the prompt as `A) ...`, and are graded on the letter. Rows and files are read by `problem_files`
(re-exported here).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ttscale.answers import is_correct
from ttscale.errors import ConfigError, UnknownNameError
from ttscale.evals.problem_files import (
    FILE_SUFFIXES,
    REQUIRED_FIELDS,
    ROW_FORMATS,
    SCHEMA_FIELDS,
    DatasetError,
    RowFormat,
    derived_id,
    json_safe,
    parse_problem,
    read_jsonl,
    read_problems,
    write_jsonl,
)
from ttscale.types import Problem

__all__ = [
    "CHAMP_NAMES",
    "DEFAULT_SIZE",
    "FILE_SUFFIXES",
    "HUB_SETS",
    "LETTERS",
    "REASONING_GYM_DEFAULTS",
    "REQUIRED_FIELDS",
    "ROW_FORMATS",
    "SCHEMA_FIELDS",
    "Dataset",
    "DatasetError",
    "Grader",
    "RowFormat",
    "convert_hub_row",
    "data_dirs",
    "derived_id",
    "known_names",
    "load_champ",
    "load_dataset",
    "load_reasoning_gym",
    "parse_problem",
    "read_jsonl",
    "read_problems",
    "reasoning_gym_tasks",
    "shuffle_choices",
    "smoke_path",
    "write_jsonl",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Hub sets: (hub repo, config, split, converter name). The converters map a hub row to the schema.
HUB_SETS: dict[str, tuple[str, str | None, str]] = {
    "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
    "aime25": ("math-ai/aime25", None, "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "gpqa-diamond": ("Idavidrein/gpqa", "gpqa_diamond", "train"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
}
REASONING_GYM_DEFAULTS = ["gsm-symbolic", "basic-arithmetic", "chain-sum", "decimal-arithmetic",
                          "fraction-simplification", "gcd", "lcm", "prime-factorization", "simple-equations",
                          "leg-counting", "products", "power-function"]
CHAMP_NAMES = ("champ", "champ-dataset")
DEFAULT_SIZE = 100


Grader = Callable[[Problem, str | None], bool | None]


@dataclass
class Dataset:
    """Problems plus how to grade them. `key` identifies the exact set (name and generation seed)."""

    name: str
    problems: list[Problem]
    source: str
    key: str = ""
    grader: Grader | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # The system prompt strategies left at "default" use here (None: none); see ttscale/prompts.py.
    system_prompt: str | None = "default"

    def __post_init__(self) -> None:
        self.key = self.key or self.name

    def __len__(self) -> int:
        return len(self.problems)

    def grade(self, problem: Problem, answer: str | None) -> bool | None:
        """Whether `answer` is right: the dataset's own scorer when it has one, else math-verify / letter match."""
        if self.grader is not None:
            return self.grader(problem, answer)
        return is_correct(answer, problem.answer, problem.kind)

    def head(self, limit: int | None) -> Dataset:
        if limit is None or limit >= len(self.problems):
            return self
        return Dataset(self.name, self.problems[:limit], self.source, self.key, self.grader, dict(self.options),
                       self.system_prompt)


# ----------------------------------------------------------------------------------------------- choices


def shuffle_choices(problem: Problem, seed: int) -> Problem:
    """Shuffle a choice problem's options under (seed, id), render them into the prompt, answer = letter.

    The reference may be given as a letter (of the original order) or as the text of the right option.
    """
    if problem.kind != "choice" or not problem.choices:
        return problem
    choices = list(problem.choices)
    correct = _correct_index(problem)
    order = list(range(len(choices)))
    if problem.metadata.get("shuffle", True):
        random.Random(f"{seed}:{problem.id}").shuffle(order)
    shuffled = [choices[i] for i in order]
    letter = LETTERS[order.index(correct)] if correct is not None else None
    options = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(shuffled))
    meta = {**problem.metadata, "choice_order": order, "answer_text": choices[correct] if correct is not None else None}
    update: dict[str, Any] = {"choices": shuffled, "answer": letter, "metadata": meta}
    if problem.messages:
        msgs = [dict(m) for m in problem.messages]
        last = max(i for i, m in enumerate(msgs) if m.get("role") == "user")
        msgs[last]["content"] = f"{msgs[last]['content']}\n\n{options}"
        update["messages"] = msgs
    else:
        update["prompt"] = f"{problem.prompt}\n\n{options}"
    return problem.model_copy(update=update)


def _correct_index(problem: Problem) -> int | None:
    ans = problem.answer
    if ans is None:
        return None
    choices = problem.choices or []
    a = ans.strip()
    if len(a) == 1 and a.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(a.upper())
    for i, c in enumerate(choices):
        if c.strip() == a:
            return i
    raise DatasetError(f"problem {problem.id!r}: answer {ans!r} is neither a letter nor one of its choices")


# ----------------------------------------------------------------------------------------------- sources


def smoke_path() -> Path:
    return Path(str(resources.files("ttscale.evals") / "data" / "smoke.jsonl"))


def reasoning_gym_tasks() -> list[str]:
    """Every reasoning-gym task name in dash form (empty when reasoning_gym is not installed)."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        return []
    return sorted(n.replace("_", "-") for n in DATASETS)


def known_names() -> list[str]:
    return sorted({"smoke", *HUB_SETS, *CHAMP_NAMES, *reasoning_gym_tasks()})


def load_reasoning_gym(task: str, size: int, seed: int) -> Dataset:
    """Generate `size` problems of a reasoning-gym task offline; graded by its scorer or math-verify.

    Item i depends only on (task, seed, i), so a larger `--limit` extends a run instead of changing it.
    """
    import reasoning_gym

    rg_name = task.replace("-", "_")
    ds = reasoning_gym.create_dataset(rg_name, size=size, seed=seed)
    problems: list[Problem] = []
    entries: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(ds):
        pid = f"{task}-s{seed}-{i}"
        answer = None if entry.get("answer") is None else str(entry["answer"])
        kind: Literal["math", "free"] = "math" if answer is not None and _looks_numeric(answer) else "free"
        problems.append(Problem(id=pid, prompt=entry["question"], answer=answer, kind=kind,
                                metadata={"source": "reasoning_gym", "task": rg_name, "index": i,
                                          **json_safe(entry.get("metadata", {}))}))
        entries[pid] = entry

    def grade(problem: Problem, answer: str | None) -> bool | None:
        if problem.answer is None:
            return None
        if answer is None:
            return False
        if is_correct(answer, problem.answer, problem.kind):
            return True
        entry = entries.get(problem.id)
        if entry is None:
            return False
        try:
            return float(ds.score_answer(answer, entry)) >= 1.0
        except Exception:  # noqa: BLE001 - a scorer that cannot read this answer counts it wrong
            return False

    return Dataset(task, problems, f"reasoning_gym:{rg_name}", key=f"{task}@seed{seed}", grader=grade,
                   options={"seed": seed})


def _looks_numeric(s: str) -> bool:
    return re.fullmatch(r"\s*-?\d+(?:[./]\d+)?\s*", s) is not None


def load_champ() -> Dataset:
    """The 270 CHAMP problems (answers are short texts; numeric ones graded by math-verify)."""
    try:
        import champ_dataset
    except ImportError as exc:
        raise DatasetError("CHAMP needs the champ_dataset package: pip install champ-dataset") from exc
    ds = champ_dataset.load("v0")
    problems = []
    for pid, p in ds.problems.items():
        ans = str(p.answer)
        problems.append(Problem(id=str(pid), prompt=p.text, answer=ans,
                                kind="math" if _looks_numeric(ans) or "\\" in ans else "free",
                                metadata={"source": "champ_dataset", "category": p.category}))
    return Dataset("champ", problems, "champ_dataset:v0", key="champ")


def data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Where named sets are looked for: the given dir, $TTSCALE_DATA (os.pathsep-separated), the cache."""
    from ttscale.models import cache_dir

    dirs = [Path(data_dir)] if data_dir else []
    env = os.environ.get("TTSCALE_DATA")
    if env:
        dirs += [Path(d) for d in env.split(os.pathsep) if d]
    dirs.append(cache_dir() / "data")
    return dirs


def _local_file(name: str, data_dir: str | Path | None) -> Path | None:
    for d in data_dirs(data_dir):
        for stem in (name, name.replace("-", "_")):
            for suffix in FILE_SUFFIXES:
                p = d / f"{stem}{suffix}"
                if p.is_file():
                    return p
    return None


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_rows(name: str) -> list[dict[str, Any]]:
    repo, config, split = HUB_SETS[name]
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise ImportError("downloading from the hub needs `pip install datasets`") from exc
    d = hf_datasets.load_dataset(repo, config, split=split)
    return [dict(r) for r in d]


def convert_hub_row(name: str, row: dict[str, Any], i: int) -> Problem:
    """A hub row of one of the named sets in the schema."""
    if name in ("aime24", "aime25"):
        return Problem(id=str(row.get("id", i)), prompt=row["problem"], answer=str(row["answer"]), kind="math")
    if name == "math500":
        return Problem(id=str(row.get("unique_id", i)), prompt=row["problem"], answer=str(row["answer"]),
                       kind="math", metadata={k: row[k] for k in ("subject", "level") if k in row})
    if name == "gsm8k":
        return Problem(id=f"gsm8k-{i}", prompt=row["question"], answer=row["answer"].split("####")[-1].strip(),
                       kind="math")
    if name == "gpqa-diamond":
        choices = [row["Correct Answer"].strip()] + [row[f"Incorrect Answer {j}"].strip() for j in (1, 2, 3)]
        return Problem(id=str(row.get("Record ID", i)), prompt=row["Question"].strip(), answer="A",
                       kind="choice", choices=choices)
    raise DatasetError(f"no hub converter for {name!r}")


def _load_named(name: str, data_dir: str | Path | None) -> tuple[list[Problem], str]:
    local = _local_file(name, data_dir)
    if local is not None:
        return read_problems(local), str(local)
    where = ", ".join(str(d) for d in data_dirs(data_dir))
    how = (f"put a JSONL file (the schema of docs/datasets.md, or the set's raw Hugging Face rows) at "
           f"<dir>/{name}.jsonl, or its parquet file at <dir>/{name}.parquet, with <dir> one of: {where} "
           f"(pass --data-dir DIR or set TTSCALE_DATA=DIR)")
    if _hub_offline():
        raise DatasetError(f"dataset {name!r} is not available offline (HF_HUB_OFFLINE is set): {how}")
    try:
        rows = _hub_rows(name)
    except Exception as exc:  # no network, gated repo, changed layout: all mean "supply the file"
        raise DatasetError(f"dataset {name!r} could not be fetched from the Hugging Face hub "
                           f"({type(exc).__name__}: {exc}); {how}") from exc
    problems = [convert_hub_row(name, r, i) for i, r in enumerate(rows)]
    from ttscale.models import cache_dir

    cached = write_jsonl(problems, cache_dir() / "data" / f"{name}.jsonl")
    return problems, f"hub:{HUB_SETS[name][0]} (cached at {cached})"


def load_dataset(name: str, *, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0,
                 shuffle: bool = True) -> Dataset:
    """A dataset by name or path (see the module docstring). `seed` drives generation and option shuffling."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    raw = name.strip()
    path = Path(raw).expanduser()
    key = raw.lower()
    if raw.lower().endswith(FILE_SUFFIXES) or path.is_file():
        ds = Dataset(path.stem, read_problems(path), str(path), key=f"{path.stem}@{_file_tag(path)}")
    elif key == "smoke":
        ds = Dataset("smoke", read_problems(smoke_path()), "bundled:smoke.jsonl", key="smoke")
    elif key in CHAMP_NAMES:
        ds = load_champ()
    elif key.startswith("rg:") or key.replace("_", "-") in reasoning_gym_tasks():
        task = key.removeprefix("rg:").replace("_", "-")
        if task not in reasoning_gym_tasks():
            raise UnknownNameError("reasoning-gym task", task, reasoning_gym_tasks())
        return load_reasoning_gym(task, size=limit or DEFAULT_SIZE, seed=seed)
    elif key in HUB_SETS:
        probs, source = _load_named(key, data_dir)
        ds = Dataset(key, probs, source, key=key)
    else:
        local = _local_file(raw, data_dir)
        if local is None:
            raise UnknownNameError("dataset", raw, known_names() + ["<path/to/file.jsonl>", "<path/to/file.parquet>"])
        ds = Dataset(raw, read_problems(local), str(local), key=raw)
    if shuffle and any(p.kind == "choice" for p in ds.problems):
        ds.problems = [shuffle_choices(p, seed) for p in ds.problems]
        ds.key = f"{ds.key}@shuffle{seed}"
        ds.options["shuffle_seed"] = seed
    return ds.head(limit)


def _file_tag(path: Path) -> str:
    """A short content hash, so results of an edited file are not mixed with the old file's."""
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]
