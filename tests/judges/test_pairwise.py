"""Pair judges: lexical, embedding, classifier (focal loss) and `ttscale judge train|eval`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ttscale.errors import ConfigError
from ttscale.judges.cli import register
from ttscale.judges.pairwise import (
    ClassifierJudge,
    ClassifierModel,
    LexicalJudge,
    evaluate,
    focal_loss,
    load_pairs,
    ngram_overlap,
    oversample_minority,
    p_yes,
    pair_features,
    reasoning_prefix,
    tnr_at_fnr,
    train_classifier,
)

VOCAB = [f"w{i}" for i in range(400)]


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """'same' pairs share most words and the final number; 'different' pairs share neither (~35% same)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a_words = rng.sample(VOCAB, 30)
        same = rng.random() < 0.35
        if same:
            b_words = a_words[:22] + rng.sample(VOCAB, 8)
            rng.shuffle(b_words)
            na = nb = str(rng.randint(0, 999))
        else:
            b_words = rng.sample(VOCAB, 30)
            na, nb = str(rng.randint(0, 499)), str(rng.randint(500, 999))
        rows.append({"a": " ".join(a_words) + f" so {na}", "b": " ".join(b_words) + f" so {nb}", "same": same})
    return rows


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def xy(rows):
    X = np.stack([pair_features(r["a"], r["b"]) for r in rows])
    return X, np.array([int(r["same"]) for r in rows])


def test_classifier_separates_separable_pairs_and_not_shuffled_ones():
    train, test = synthetic_pairs(400, 0), synthetic_pairs(400, 1)
    X, y = xy(train)
    Xt, yt = xy(test)
    model = train_classifier(X, y)
    assert evaluate(yt, model.predict(Xt))["auroc"] > 0.9
    # With labels shuffled (train and held-out alike) there is nothing to learn: AUROC stays near chance.
    rng = np.random.default_rng(0)
    noise = train_classifier(X, rng.permutation(y))
    assert abs(evaluate(rng.permutation(yt), noise.predict(Xt))["auroc"] - 0.5) < 0.1


def test_focal_loss_down_weights_easy_examples():
    y = np.array([1, 1])
    easy, hard = focal_loss(np.array([0.95, 0.95]), y), focal_loss(np.array([0.3, 0.3]), y)
    bce_ratio = np.log(0.3) / np.log(0.95)
    assert hard / easy > bce_ratio  # the (1-p)^gamma factor makes hard examples count more than in BCE
    assert focal_loss(np.array([0.5]), np.array([1]), gamma=0.0, alpha=0.5) == pytest.approx(0.5 * np.log(2))


def test_oversampling_doubles_the_rarer_class():
    X = np.arange(10, dtype=float)[:, None]
    y = np.array([1] * 7 + [0] * 3)
    Xo, yo = oversample_minority(X, y, 2)
    assert (yo == 0).sum() == 6 and (yo == 1).sum() == 7 and len(Xo) == 13
    _, yo = oversample_minority(X, 1 - y, 2)  # "same" is the rarer class in SmolLM2's traces
    assert (yo == 1).sum() == 6 and (yo == 0).sum() == 7


def test_tau_for_fpr_joins_at_most_the_target_share_of_different_pairs():
    from ttscale.judges.pairwise import tau_for_fpr

    y = np.array([0] * 10 + [1] * 3)
    scores = np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.9, 0.5, 0.6, 0.95])
    tau = tau_for_fpr(y, scores, 0.1)
    assert tau == 0.45 and np.mean(scores[y == 0] > tau) == 0.1
    assert tau_for_fpr(y, scores, 0.0) == 0.9
    with pytest.raises(ConfigError, match="target FPR"):
        tau_for_fpr(y, scores, 1.0)


def test_tnr_at_fnr_on_a_known_ranking():
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.65, 0.3, 0.2, 0.15, 0.05])
    # keeping 80% of positives needs threshold 0.6: negatives above it: 0.65 -> TNR 4/5
    assert tnr_at_fnr(y, s, 0.2) == pytest.approx(0.8)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=0, max_size=80), st.text(min_size=0, max_size=80))
def test_lexical_overlap_is_a_symmetric_probability(a, b):
    v = ngram_overlap(a, b)
    assert 0.0 <= v <= 1.0 and v == pytest.approx(ngram_overlap(b, a))
    assert ngram_overlap(a, a) == 1.0


def test_reasoning_prefix_and_p_yes():
    text = "Let x be 2. So we add. Wait, then thus done."
    assert reasoning_prefix(text, 3) == "Let x be 2. So we add. Wait"
    assert reasoning_prefix(text, 10) is None
    assert p_yes({"Yes": np.log(0.6), " no": np.log(0.2), "maybe": -1.0}) == pytest.approx(0.75)
    assert p_yes({"maybe": -0.1}) is None


def test_classifier_round_trips_and_rejects_other_files(tmp_path):
    X, y = xy(synthetic_pairs(100, 3))
    m = train_classifier(X, y, steps=200)
    m.save(tmp_path / "m.json")
    j = ClassifierJudge(tmp_path / "m.json")
    assert j.p_same("a b so 1", "a b so 1") == pytest.approx(ClassifierJudge(m).p_same("a b so 1", "a b so 1"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a ttscale pair classifier"):
        ClassifierModel.load(tmp_path / "bad.json")


def test_pair_file_errors_name_the_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"a": "x", "b": "y", "same": true}\n{"a": "x", "same": false}\n')
    with pytest.raises(ConfigError, match=r"pairs.jsonl:2: .*'b'"):
        load_pairs(p)


@pytest.fixture
def cli():
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)
    return app


def test_cli_train_then_eval_prints_auroc_and_tnr(cli, tmp_path):
    train = write(tmp_path / "train.jsonl", synthetic_pairs(300, 0))
    test = write(tmp_path / "test.jsonl", synthetic_pairs(200, 1))
    runner = CliRunner()
    r = runner.invoke(cli, ["judge", "train", "--pairs", str(train), "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.json").exists()
    r = runner.invoke(cli, ["judge", "eval", "--pairs", str(test), "--judge", f"classifier:{tmp_path / 'm.json'}"])
    assert r.exit_code == 0, r.output
    auroc = float(r.output.split("AUROC")[1].split()[0])
    tnr = float(r.output.split("TNR@0.2FNR")[1].split()[0])
    _, y = load_pairs(test)
    pairs, _ = load_pairs(test)
    expected = evaluate(y, ClassifierJudge(tmp_path / "m.json").p_same_many(pairs))
    assert auroc == pytest.approx(expected["auroc"], abs=1e-4) and auroc > 0.9
    assert tnr == pytest.approx(expected["tnr_at_0.2_fnr"], abs=1e-4)
    r = runner.invoke(cli, ["judge", "eval", "--pairs", str(test), "--judge", "lexical"])
    assert r.exit_code == 0 and "AUROC" in r.output and "TNR@0.2FNR" in r.output


def test_cli_names_bad_input(cli, tmp_path):
    r = CliRunner().invoke(cli, ["judge", "eval", "--pairs", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())
    p = write(tmp_path / "p.jsonl", [{"a": "x", "b": "y", "same": True}])
    r = CliRunner().invoke(cli, ["judge", "eval", "--pairs", str(p), "--judge", "magic"])
    assert r.exit_code == 2 and "unknown judge" in " ".join(r.output.split())


def test_embedding_judge_ranks_paraphrases_above_unrelated_text(embedding_judge):
    a = "Since 17 + 25 = 42, the sum is 42."
    b = "Adding 17 and 25 gives 42, so the total is 42."
    c = "The probability of drawing a red ball is 3/8."
    assert embedding_judge.p_same(a, b) > embedding_judge.p_same(a, c)
    many = embedding_judge.p_same_many([(a, b), (a, c)])
    assert many[0] == pytest.approx(embedding_judge.p_same(a, b), abs=1e-5)
    assert LexicalJudge().p_same(a, a) == 1.0


async def test_llm_judge_reads_p_yes_from_the_first_tokens_top_logprobs():
    from ttscale.backends.scripted import Script, ScriptedBackend
    from ttscale.judges.pairwise import LLMJudge

    be = ScriptedBackend([Script(text="Yes", logprob=-0.2), Script(text="no", logprob=-0.1), Script(text="maybe")])
    j = LLMJudge(be, top_logprobs=3)
    assert await j.ap_same("a", "b") == 1.0  # only "Yes" among the candidates
    assert await j.ap_same("a", "b") == 0.0
    assert await j.ap_same("a", "b") == 0.5 and j.undecided == 1
    req = be.requests[0]
    assert req.sampling.max_tokens == 1 and req.sampling.logprobs == 3 and req.sampling.temperature == 0.0
    assert "Solution A:\na" in req.messages[0]["content"]
    assert j.usage.calls == 3 and j.usage.generated_tokens == 3
    with pytest.raises(RuntimeError, match="await ap_same"):
        j.p_same("a", "b")


def test_llm_judge_refuses_a_backend_without_logprobs():
    from ttscale.backends.base import Capabilities
    from ttscale.backends.scripted import ScriptedBackend
    from ttscale.judges.pairwise import LLMJudge

    be = ScriptedBackend(["x"])
    be.capabilities = Capabilities(top_logprobs=0)
    with pytest.raises(ConfigError, match="top logprobs"):
        LLMJudge(be)


def test_cli_llm_judge_needs_a_backend(cli, tmp_path):
    p = write(tmp_path / "p.jsonl", [{"a": "x", "b": "y", "same": True}, {"a": "x", "b": "z", "same": False}])
    r = CliRunner().invoke(cli, ["judge", "eval", "--pairs", str(p), "--judge", "llm"])
    assert r.exit_code == 2 and "--backend" in " ".join(r.output.split())


def test_embedder_cache_is_a_bounded_lru():
    from ttscale.judges.pairwise import Embedder

    emb = Embedder(cache_size=3)
    first = emb.embed(["one", "two", "three"])
    emb.embed(["one"])  # "one" is now the most recent, so "two" is the oldest
    emb.embed(["four"])
    assert list(emb._cache) == ["three", "one", "four"]
    again = emb.embed(["two", "one"])  # "two" is encoded anew, to the same vector
    assert np.allclose(again[0], first[1], atol=1e-6) and np.allclose(again[1], first[0])
    assert len(emb._cache) == 3 and list(emb._cache)[-2:] == ["two", "one"]
    with pytest.raises(ConfigError, match="cache_size"):
        Embedder(cache_size=0)


def test_judged_prefix_by_words_tokens_or_whole_text():
    from ttscale.judges.pairwise import judged_prefix

    text = "Let x be 2. So we add. Wait, then thus done."
    assert judged_prefix(text, done=False, num_tokens=12, prefix_words=3) == "Let x be 2. So we add. Wait"
    assert judged_prefix(text, done=False, num_tokens=12, prefix_words=10) is None
    assert judged_prefix(text, done=True, num_tokens=12, prefix_words=10) == text
    assert judged_prefix(text, done=False, num_tokens=4, prefix_tokens=6) is None
    assert judged_prefix(text, done=False, num_tokens=6, prefix_tokens=6) == text
    assert judged_prefix(text, done=False, num_tokens=12, prefix_tokens=6) == text[: len(text) // 2]


def test_split_problems_is_disjoint_reproducible_and_checked():
    from ttscale.judges.pairwise import split_problems

    ids = [f"p{i}" for i in range(10)]
    train, held = split_problems(ids, 0.3, seed=1)
    assert len(held) == 3 and not set(train) & set(held) and sorted(train + held) == sorted(ids)
    assert split_problems(list(reversed(ids)), 0.3, seed=1) == (train, held)
    assert split_problems(ids, 0.3, seed=2) != (train, held)
    with pytest.raises(ConfigError, match="heldout_frac"):
        split_problems(ids, 1.0)


def _bank(tmp_path):
    """A real JSONL trace bank: two problems, answers that math-verify must group (1/2 == 0.5)."""
    from ttscale.evals.bank import RecordedDelta, RecordedTrace, TraceBank
    from ttscale.types import Problem

    bank = TraceBank(tmp_path / "bank.jsonl", create=True)
    bank.set_meta(bank_id="t")
    texts = {"q1": ["First half it. So \\boxed{1/2}", "First halve. So \\boxed{0.5}", "Add them. So \\boxed{3}",
                    "No answer here"],
             "q2": ["Then 7. So \\boxed{7}", "Then 8. So \\boxed{8}"]}
    for pid, ts in texts.items():
        traces = []
        for i, t in enumerate(ts):
            words = t.split(" ")
            deltas = [RecordedDelta(text=(" " if j else "") + w, num_tokens=1, t=0.1 * j, seq=j,
                                    finished=j == len(words) - 1) for j, w in enumerate(words)]
            traces.append(RecordedTrace(problem_id=pid, index=i, start=0.0, request_id="r", deltas=deltas,
                                        status="finished"))
        bank.put(Problem(id=pid, prompt=f"question {pid}", answer="1"), traces)
    return bank.path


def test_bank_pairs_label_answer_equivalence_on_prefixes(tmp_path):
    from ttscale.judges.pairwise import bank_pairs

    rows = bank_pairs(_bank(tmp_path), ["q1"], prefix_tokens=2)
    assert [(r["traces"], r["same"]) for r in rows] == [([0, 1], True), ([0, 2], False), ([1, 2], False)]
    assert rows[0]["a"] == "First half" and rows[0]["b"] == "First halve."  # the first 2 tokens only
    with pytest.raises(ConfigError, match="'q9'"):
        bank_pairs(_bank(tmp_path / "x"), ["q9"])


def test_cli_pairs_then_train_reports_heldout_auroc_and_stores_it(cli, tmp_path):
    bank = _bank(tmp_path)
    runner = CliRunner()
    r = runner.invoke(cli, ["judge", "pairs", "--bank", str(bank), "--out-dir", str(tmp_path / "d"),
                            "--prefix-tokens", "3"])
    assert r.exit_code == 0, r.output
    split = json.loads((tmp_path / "d" / "split.json").read_text())
    assert sorted(split["train"] + split["heldout"]) == ["q1", "q2"] and split["prefix"] == {"tokens": 3}
    # train on synthetic pairs, report on the bank's held-out side when it has both labels
    train = write(tmp_path / "train.jsonl", synthetic_pairs(200, 0))
    held = write(tmp_path / "held.jsonl", synthetic_pairs(100, 1))
    r = runner.invoke(cli, ["judge", "train", "--pairs", str(train), "--heldout", str(held), "--split",
                            str(tmp_path / "d" / "split.json"), "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    report = ClassifierModel.load(tmp_path / "m.json").report
    printed = float(r.output.split("held-out AUROC")[1].split()[0])
    assert printed == pytest.approx(report["heldout"]["auroc"], abs=1e-4) and printed > 0.9
    hp, hy = load_pairs(held)
    tau = report["tau"]  # calibrated on the training pairs: at most 10% of their "different" pairs above it
    train_scores = ClassifierJudge(tmp_path / "m.json").p_same_many(load_pairs(train)[0])
    assert np.mean(train_scores[load_pairs(train)[1] == 0] > tau) <= 0.1 and report["tau_rule"] != "given"
    assert report["heldout"]["fpr"] == pytest.approx(
        float(np.mean(ClassifierJudge(tmp_path / "m.json").p_same_many(hp)[hy == 0] > tau)))
    assert report["prefix"] == {"tokens": 3} and report["split"]["heldout"] == split["heldout"]
