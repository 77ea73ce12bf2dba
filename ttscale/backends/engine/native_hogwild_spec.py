"""The data of a Hogwild run on our engine: its inputs (`HogwildSpec`), the workers' state, its outcome, the
authors' end-of-step rule and the KV blocks a run may need (the run itself: `native_hogwild`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ttscale.backends.engine.kv_cache import Segment
from ttscale.backends.engine.native_common import SamplingRow, _blocks_for

# The authors' end-of-step characters (`formatting.MathFormatting.end_of_step_chars`), before the blank line.
END_OF_STEP_CHARS = ".?!。۔؟।॥…‽།᠃։჻¶❧"
STEP_SEP = "\n\n"

Decode = Callable[[list[int]], str]


def is_step_end(text: str, last_token: str | None = None) -> bool:
    """The authors' rule (`MathFormatting.is_end_of_step`): the step's last token completes a blank line,
    and the text before the last blank line, stripped, ends with sentence-ending punctuation. `last_token`
    is that token's text (None: the whitespace the text ends with). Unlike the authors' check, a blank line
    split over two tokens counts too (SmolLM2 often writes it as two `\\n` tokens)."""
    if last_token is None:
        last_token = text[len(text.rstrip(" \t\r\n")):]
    cut = text.rfind(STEP_SEP)
    if cut < 0 or cut + len(STEP_SEP) <= len(text) - len(last_token):
        return False  # no blank line, or it was complete before the last token
    return text[:cut].strip().endswith(tuple(END_OF_STEP_CHARS))


@dataclass
class HogwildSpec:
    """Inputs of one Hogwild run, all as token ids (the strategy builds them from text)."""

    prompt_ids: list[int]
    workers: int = 2
    layout: Literal["combined", "contiguous"] = "combined"
    max_steps: int = 512
    others_header: list[int] = field(default_factory=list)
    own_header: list[int] = field(default_factory=list)
    step_prefix: list[list[int]] = field(default_factory=list)  # per worker, unindexed ("Alice: ")
    # (worker, step index from 1) -> the step's header ids, e.g. "**Alice [5]:** " (the authors'); wins over
    # `step_prefix`
    step_header: Callable[[int, int], list[int]] | None = None
    first_step: list[list[int]] = field(default_factory=list)  # per worker, forced start of step 1
    pivot: list[int] = field(default_factory=list)  # "<...>\n\n" after each other's step but the last
    banned_ids: list[int] = field(default_factory=list)  # never sampled by a worker (EOS, "#", </think>)
    check_ids: list[int] = field(default_factory=list)  # "Quick check: am I doing redundant work? (yes/no): "
    check_every: int = 256
    final_ids: list[int] = field(default_factory=list)  # "... final answer is \boxed{"
    final_tokens: int = 16
    sampling: SamplingRow = field(default_factory=SamplingRow)
    eos_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop_on_boxed: bool = True  # stop when `answered` holds for a worker's current step (or the final)
    # the completion predicate over a step's text (the strategy's "has a closed \boxed{}"); None: never
    answered: Callable[[str], bool] | None = None


@dataclass
class WorkerState:
    """One worker's place in a run: its current step segment, the tokens waiting to be written, its counts."""

    index: int
    step: Segment
    pending: list[int]
    tokens: list[int] = field(default_factory=list)  # every token this worker wrote or will write
    step_tokens: list[int] = field(default_factory=list)
    since_check: int = 0
    forwards: int = 0
    sampled: int = 0
    done: bool = False
    steps_done: int = 0
    closing: bool = False  # the pending token ends the step: once written, the step moves to the common block


@dataclass
class HogwildOutcome:
    """What a Hogwild run wrote and spent."""

    worker_tokens: list[list[int]]
    transcript: list[tuple[int, list[int]]]  # (worker or -1 for prompt/final, tokens) in common order
    answer_worker: int | None
    final_tokens: list[int]
    forwards: int  # sequential forward passes (steps)
    generated: int  # sampled tokens, all workers
    forced: int  # forced tokens (headers, quick checks, final prompt)
    prompt_tokens: int
    peak_blocks: int
    finish: str  # "boxed" | "eos" | "budget"


def hogwild_blocks(spec: HogwildSpec, block_size: int = 16) -> int:
    """KV blocks a Hogwild run of `spec` may use (prompt, every worker's steps and headers, the final)."""
    W = spec.workers
    hint = len(spec.prompt_ids) + W * (spec.max_steps + 64) + 4 * W * (len(spec.check_ids) + 16)
    hint += W * (len(spec.pivot) + 16) + sum(len(f) for f in spec.first_step)
    return _blocks_for(hint + len(spec.final_ids) + spec.final_tokens, block_size)
