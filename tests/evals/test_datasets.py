"""Dataset loaders: schema errors name the line and field; names; choice shuffling; generated sets."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from ttscale.errors import UnknownNameError
from ttscale.evals.datasets import (
    HUB_SETS,
    DatasetError,
    load_dataset,
    read_jsonl,
    shuffle_choices,
    write_jsonl,
)
from ttscale.types import Problem


def _write(tmp_path, lines, name="set.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


GOOD = {"id": "a", "prompt": "1+1?", "answer": "2"}


@pytest.mark.parametrize("bad, line, field", [
    ({"id": "b", "prompt": "x"}, 2, "'answer'"),
    ({"id": "b", "answer": "1"}, 2, "'prompt'"),
    ({"id": "b", "prompt": "x", "answer": "A", "kind": "choice"}, 2, "'choices'"),
    ({"id": "b", "prompt": "x", "answer": "1", "level": 3}, 2, "level"),
])
def test_malformed_line_names_line_and_field(tmp_path, bad, line, field):
    p = _write(tmp_path, [GOOD, bad, {**GOOD, "id": "c"}])
    with pytest.raises(DatasetError) as e:
        read_jsonl(p)
    msg = str(e.value)
    assert f"{p}:{line}:" in msg and field in msg


def test_bad_json_and_duplicate_ids(tmp_path):
    p = _write(tmp_path, [GOOD, GOOD, "{not json"])
    with pytest.raises(DatasetError, match=r":2: duplicate id 'a' \(first on line 1\)"):
        read_jsonl(p)
    p = _write(tmp_path, [GOOD, "{not json"], "b.jsonl")
    with pytest.raises(DatasetError, match=r"b.jsonl:2: not valid JSON"):
        read_jsonl(p)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.jsonl"))


def test_unknown_name_lists_known_ones():
    with pytest.raises(UnknownNameError) as e:
        load_dataset("aime2099")
    msg = str(e.value)
    for name in ["aime24", "aime25", "math500", "gpqa-diamond", "gsm8k", "smoke", "champ", "gsm-symbolic",
                 "chain-sum", "basic-arithmetic"]:
        assert name in msg


def test_named_set_offline_says_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TTSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TTSCALE_DATA", raising=False)
    with pytest.raises(DatasetError) as e:
        load_dataset("aime24")
    msg = str(e.value)
    assert "aime24.jsonl" in msg and "--data-dir" in msg and "TTSCALE_DATA" in msg and "docs/datasets.md" in msg
    # the same name loads from a local file in the schema, found through --data-dir or TTSCALE_DATA
    write_jsonl([Problem(id="p1", prompt="What is 2+2?", answer="4")], tmp_path / "data" / "aime24.jsonl")
    assert [p.id for p in load_dataset("aime24", data_dir=tmp_path / "data").problems] == ["p1"]
    monkeypatch.setenv("TTSCALE_DATA", str(tmp_path / "data"))
    assert len(load_dataset("aime24")) == 1


def test_hub_rows_convert_to_schema():
    from ttscale.evals.datasets import convert_hub_row

    g = convert_hub_row("gsm8k", {"question": "q?", "answer": "work\n#### 72"}, 3)
    assert (g.id, g.answer) == ("gsm8k-3", "72")
    row = {"Question": "Which?", "Correct Answer": "right", "Incorrect Answer 1": "w1",
           "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3", "Record ID": "r1"}
    q = shuffle_choices(convert_hub_row("gpqa-diamond", row, 0), seed=5)
    assert q.choices[ord(q.answer) - ord("A")] == "right"
    assert set(HUB_SETS) == {"aime24", "aime25", "math500", "gpqa-diamond", "gsm8k"}


def test_choice_shuffle_is_seeded_and_grades_the_letter():
    p = Problem(id="q", prompt="Pick the even one.", answer="12", kind="choice", choices=["7", "12", "9", "15"])
    a, b, c = shuffle_choices(p, 1), shuffle_choices(p, 1), shuffle_choices(p, 2)
    assert a == b
    assert a.choices[ord(a.answer) - ord("A")] == "12"
    assert f"{a.answer}) 12" in a.prompt
    # over many seeds the right option lands on every letter
    letters = Counter(shuffle_choices(p, s).answer for s in range(40))
    assert set(letters) == {"A", "B", "C", "D"}
    assert c.metadata["choice_order"] != a.metadata["choice_order"] or c.answer == a.answer
    ds = load_dataset("smoke", seed=3)
    cap = next(x for x in ds.problems if x.id == "smoke-capital")
    right = f"\\boxed{{{cap.answer}}}"
    wrong = "\\boxed{" + next(ch for ch in "ABCD" if ch != cap.answer) + "}"
    from ttscale.answers import extract_answer

    assert ds.grade(cap, extract_answer(right, "choice", cap.choices)) is True
    assert ds.grade(cap, extract_answer(wrong, "choice", cap.choices)) is False


def test_reasoning_gym_is_seeded_offline_and_uses_its_scorer():
    a = load_dataset("gsm-symbolic", limit=5, seed=7)
    b = load_dataset("gsm-symbolic", limit=5, seed=7)
    c = load_dataset("rg:chain-sum", limit=5, seed=8)
    assert [p.prompt for p in a.problems] == [p.prompt for p in b.problems]
    longer = load_dataset("gsm-symbolic", limit=12, seed=7)
    assert [p.prompt for p in longer.problems[:5]] == [p.prompt for p in a.problems] and longer.key == a.key
    assert a.key != load_dataset("gsm-symbolic", limit=5, seed=8).key
    assert len(a) == 5 and all(p.answer for p in a.problems)
    for p in a.problems + c.problems:
        assert a.grade(p, p.answer) if p in a.problems else c.grade(p, p.answer)
        assert not (a.grade(p, "-99999") if p in a.problems else c.grade(p, "-99999"))
    words = load_dataset("word-sorting", limit=2, seed=0)
    p = words.problems[0]
    assert p.kind == "free" and words.grade(p, p.answer) is True


def test_champ_and_smoke():
    ch = load_dataset("champ")
    assert len(ch) == 270 and all(p.answer for p in ch.problems)
    assert len(load_dataset("champ-dataset", limit=3)) == 3
    sm = load_dataset("smoke")
    assert len(sm) >= 8 and any(p.kind == "choice" for p in sm.problems) and any(p.messages for p in sm.problems)


def test_jsonl_roundtrip_and_limit(tmp_path):
    probs = [Problem(id=f"p{i}", prompt=f"{i}+1?", answer=str(i + 1)) for i in range(5)]
    path = write_jsonl(probs, tmp_path / "x.jsonl")
    ds = load_dataset(str(path), limit=3)
    assert [p.id for p in ds.problems] == ["p0", "p1", "p2"]
    assert ds.key.startswith("x@")


# --------------------------------------------------------------------------- Hugging Face rows, parquet

MATH500_ROW = {"problem": "Convert the point $(0,3)$ to polar coordinates.",
               "solution": "... \\boxed{(3,\\frac{\\pi}{2})}",
               "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
               "unique_id": "test/precalculus/807.json"}
GSM8K_ROW = {"question": "Natalia sold clips to 48 friends and half as many in May. How many altogether?",
             "answer": "In May she sold 48/2 = <<48/2=24>>24.\n48+24 = <<48+24=72>>72\n#### 1,072"}
AIME_ROW = {"ID": "2024-I-1", "Problem": "Every morning Aya walks 9 km ...", "Solution": "...", "Answer": 204}
AIME_LOWER_ROW = {"id": 60, "problem": "Let $p$ be the least prime ...", "answer": "110", "url": "https://x"}
GPQA_ROW = {"Question": " Which is a noble gas? ", "Correct Answer": "Neon", "Incorrect Answer 1": "Oxygen",
            "Incorrect Answer 2": "Nitrogen", "Incorrect Answer 3": "Chlorine", "Record ID": "rec42",
            "Subdomain": "Chemistry"}


def test_hf_rows_map_to_problems(tmp_path):
    p = _write(tmp_path, [MATH500_ROW, GSM8K_ROW, AIME_ROW, AIME_LOWER_ROW, GPQA_ROW], "hf.jsonl")
    math, gsm, aime, aime2, gpqa = read_jsonl(p)
    assert (math.id, math.kind, math.answer) == ("test/precalculus/807.json", "math", MATH500_ROW["answer"])
    assert math.prompt == MATH500_ROW["problem"]
    assert math.metadata == {"solution": MATH500_ROW["solution"], "subject": "Precalculus", "level": 2}
    assert (gsm.answer, gsm.kind) == ("1072", "math") and gsm.prompt == GSM8K_ROW["question"]
    assert gsm.metadata["solution"].endswith("72") and gsm.id.startswith("1-")
    assert (aime.id, aime.answer, aime.prompt) == ("2024-I-1", "204", AIME_ROW["Problem"])
    assert (aime2.id, aime2.answer, aime2.metadata) == ("60", "110", {"url": "https://x"})
    assert (gpqa.id, gpqa.kind, gpqa.answer, gpqa.prompt) == ("rec42", "choice", "A", "Which is a noble gas?")
    assert gpqa.choices == ["Neon", "Oxygen", "Nitrogen", "Chlorine"]
    # loaded as a dataset, the choice is shuffled and graded on the letter of "Neon"
    ds = load_dataset(str(p), seed=3)
    g = next(x for x in ds.problems if x.id == "rec42")
    assert g.choices[ord(g.answer) - ord("A")] == "Neon" and f"{g.answer}) Neon" in g.prompt
    assert ds.grade(next(x for x in ds.problems if x.id == "2024-I-1"), "204") is True


def test_derived_ids_are_stable_and_distinct(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(5)]
    rows.append({"prompt": "Schema row without an id", "answer": "1"})
    a = read_jsonl(_write(tmp_path, rows, "a.jsonl"))
    b = read_jsonl(_write(tmp_path, rows, "b.jsonl"))
    assert [p.id for p in a] == [p.id for p in b]
    assert len({p.id for p in a}) == len(rows)
    assert all(p.id.startswith(f"{i}-") for i, p in enumerate(a))
    changed = read_jsonl(_write(tmp_path, [{**rows[0], "question": "What is 9 + 9?"}], "c.jsonl"))
    assert changed[0].id != a[0].id


@pytest.mark.parametrize("row, field, fmt", [
    ({"problem": "x", "solution": "y"}, "'answer'", "MATH-500 / AIME"),
    ({"Question": "q", "Correct Answer": "a", "Incorrect Answer 1": "b"}, "'incorrect answer 2'", "GPQA"),
    ({"question": "q"}, "'answer'", "GSM8K"),
    ({"text": "q", "label": 1}, "'prompt'", "neither the schema"),
])
def test_unmappable_row_names_file_row_and_field(tmp_path, row, field, fmt):
    p = _write(tmp_path, [MATH500_ROW, row], "bad.jsonl")
    with pytest.raises(DatasetError) as e:
        read_jsonl(p)
    msg = str(e.value)
    assert f"{p}:2:" in msg and f"missing field {field}" in msg and fmt in msg


def test_parquet_files_are_read_by_path_and_by_name(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [MATH500_ROW, {**MATH500_ROW, "unique_id": "test/algebra/1.json", "problem": "1+1?", "answer": "2"}]
    path = tmp_path / "math500.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = load_dataset(str(path))
    assert [p.id for p in ds.problems] == ["test/precalculus/807.json", "test/algebra/1.json"]
    assert ds.key.startswith("math500@") and ds.problems[1].metadata["level"] == 2
    by_name = load_dataset("math500", data_dir=tmp_path)
    assert [p.id for p in by_name.problems] == [p.id for p in ds.problems] and by_name.source == str(path)
    # a row no format fits names the file and the row; a file that is not parquet says so
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([MATH500_ROW, {**MATH500_ROW, "answer": None}]), bad)
    with pytest.raises(DatasetError, match=rf"{bad}: row 1: missing field 'answer'"):
        load_dataset(str(bad))
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DatasetError, match=rf"{junk}: not a readable parquet file"):
        load_dataset(str(junk))


def test_datasets_library_parquet_export_loads(tmp_path):
    """A file written by Hugging Face `datasets` itself (what users download) loads as it is."""
    hf = pytest.importorskip("datasets")
    path = tmp_path / "gsm8k.parquet"
    hf.Dataset.from_list([GSM8K_ROW, {**GSM8K_ROW, "question": "Another?"}]).to_parquet(str(path))
    jsonl = tmp_path / "gsm8k.jsonl"
    hf.Dataset.from_list([GSM8K_ROW, {**GSM8K_ROW, "question": "Another?"}]).to_json(str(jsonl))
    a, b = load_dataset(str(path)), load_dataset(str(jsonl))
    assert [p.answer for p in a.problems] == [p.answer for p in b.problems] == ["1072", "1072"]
    assert [p.id for p in a.problems] == [p.id for p in b.problems]


@pytest.mark.parametrize("row,named", [
    ({"id": "c", "prompt": "Pick", "answer": "A", "kind": "choice", "choices": [str(i) for i in range(27)]},
     "at most 26"),
    ({"id": "m", "messages": [{"role": "system", "content": "be brief"}], "answer": "1"}, "no 'user' message"),
    ({"id": "r", "messages": [{"rol": "user", "content": "1 + 0?"}], "answer": "1"}, "messages[0]"),
    ({"id": "e", "prompt": "  ", "answer": "1"}, "'prompt' is empty"),
])
def test_rows_that_would_fail_every_run_are_refused_at_load_naming_the_line(tmp_path, row, named):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"id": "ok", "prompt": "1 + 1?", "answer": "2"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DatasetError, match=rf"bad.jsonl:2: .*{re.escape(named)}"):
        load_dataset(str(f))
