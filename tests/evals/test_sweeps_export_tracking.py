"""`ttscale eval --n 1,2,4` width sweeps, `ttscale export`, and `--track tensorboard:DIR`, as a user runs them:
real `ttscale` processes on the bundled smoke set, replaying a bank recorded from the scripted model (fast,
exact), real SQLite, and the TensorBoard event files read back record by record.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.fixtures.evals import record_bank
from ttscale.errors import ConfigError
from ttscale.evals.cli import parse_widths
from ttscale.evals.datasets import load_dataset, smoke_path
from ttscale.evals.export import ExportFile
from ttscale.evals.outputs import RESULTS_FILE, SAMPLES_FILE, ResultsFile, SampleRecord
from ttscale.evals.runner import sweep_meta
from ttscale.evals.store import ResultStore
from ttscale.strategies.registry import make_strategy

TTSCALE = [sys.executable, "-m", "ttscale.cli"]
ENV = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}
WIDTHS = (1, 2, 4)


def ttscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TTSCALE, *args], check=False, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict[str, Path]:
    """One `ttscale eval` with a width sweep plus a single-sample baseline, --output-path and --track."""
    d = tmp_path_factory.mktemp("sweep")
    loop = asyncio.new_event_loop()
    try:
        bank, store, _ = loop.run_until_complete(
            record_bank(d / "bank.db", load_dataset("smoke"), "self-consistency:n=4", d / "live.db"))
    finally:
        loop.close()
    bank.close()
    store.close()
    paths = {"bank": d / "bank.db", "db": d / "results.db", "out": d / "out", "tb": d / "tb"}
    proc = ttscale("eval", "--dataset", "smoke", "--replay", str(paths["bank"]), "--db", str(paths["db"]),
                   "--no-progress", "--strategy", "self-consistency", "--n", ",".join(map(str, WIDTHS)),
                   "--output-path", str(paths["out"]), "--track", f"tensorboard:{paths['tb']}")
    assert proc.returncode == 0, proc.stderr
    return paths


# ------------------------------------------------------------------------------------------------ sweeps


def test_widths_parse_and_bad_ones_are_named():
    assert parse_widths(None) is None and parse_widths("8") == [8] and parse_widths(" 1, 2,4 ") == [1, 2, 4]
    for bad in ("0", "1,,2", "a", "2,2", "-1"):
        with pytest.raises(ConfigError, match="--n"):
            parse_widths(bad)


def test_a_sweep_key_is_shared_across_widths_and_only_across_widths():
    keys = {sweep_meta(make_strategy(f"ffs:n={w},temperature=0.7"), w)["sweep"]["key"] for w in WIDTHS}
    assert keys == {"ffs:n=*,temperature=0.7"}
    other = sweep_meta(make_strategy("ffs:n=2,temperature=0.9"), 2)["sweep"]["key"]
    assert other not in keys
    hog = sweep_meta(make_strategy("hogwild:workers=4"), 4)["sweep"]
    assert hog == {"key": "hogwild:workers=*", "field": "workers", "value": 4}
    with pytest.raises(ConfigError, match="no width"):
        sweep_meta(make_strategy("single"), 2)


def test_eval_n_list_runs_one_labelled_run_per_width(swept):
    results = ResultsFile.model_validate_json((swept["out"] / RESULTS_FILE).read_text())
    assert len(results.configs) == len(WIDTHS)
    sweeps = [c.sweep for c in results.configs.values()]
    assert all(s is not None for s in sweeps)
    assert {s["key"] for s in sweeps} == {"self-consistency:n=*"} and {s["field"] for s in sweeps} == {"n"}
    by_width = {s["value"]: c for s, c in zip(sweeps, results.configs.values(), strict=True)}
    assert sorted(by_width) == list(WIDTHS)
    assert all(c.config["config"]["n"] == w for w, c in by_width.items())
    samples = [SampleRecord.model_validate_json(x) for x in (swept["out"] / SAMPLES_FILE).read_text().splitlines()]
    traces = {(s.run_id, len(s.traces)) for s in samples}
    assert {n for _, n in traces} == set(WIDTHS)
    with ResultStore(swept["db"]) as store:  # the label is in the store, outside the hashed config
        assert {r.meta["sweep"]["value"] for r in store.runs()} == set(WIDTHS)
        assert all("sweep" not in r.config for r in store.runs())


def test_a_width_for_a_strategy_without_one_is_bad_input(swept, tmp_path):
    proc = ttscale("eval", "--dataset", "smoke", "--replay", str(swept["bank"]), "--db", str(tmp_path / "r.db"),
                   "--no-progress", "--strategy", "single", "--n", "1,2")
    assert proc.returncode == 2 and "--n does not apply to strategy 'single'" in proc.stderr


# ------------------------------------------------------------------------------------------------ export


def without_date(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "date"}


def test_export_jsonl_writes_what_output_path_wrote(swept, tmp_path):
    out = tmp_path / "exported"
    proc = ttscale("export", "--db", str(swept["db"]), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "could not be loaded" not in proc.stderr
    assert (out / SAMPLES_FILE).read_text() == (swept["out"] / SAMPLES_FILE).read_text()
    assert without_date(json.loads((out / RESULTS_FILE).read_text())) == without_date(
        json.loads((swept["out"] / RESULTS_FILE).read_text()))


def test_export_json_is_one_document_with_the_samples(swept, tmp_path):
    with ResultStore(swept["db"]) as store:
        first = store.runs()[0].run_id
    target = tmp_path / "one" / "run.json"
    proc = ttscale("export", first[:6], "--db", str(swept["db"]), "--format", "json", "--output", str(target))
    assert proc.returncode == 0, proc.stderr
    doc = ExportFile.model_validate_json(target.read_text())
    assert list(doc.configs) == [first] and doc.n_samples == {first: len(load_dataset("smoke"))}
    lines = [SampleRecord.model_validate_json(x) for x in (swept["out"] / SAMPLES_FILE).read_text().splitlines()]
    assert doc.samples == [s for s in lines if s.run_id == first]
    assert ttscale("export", "nope", "--db", str(swept["db"]), "--output", str(tmp_path / "x")).returncode == 2
    bad = ttscale("export", "--db", str(swept["db"]), "--format", "csv", "--output", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--format must be jsonl or json" in bad.stderr


def test_export_reloads_a_dataset_file_where_it_was_and_a_moved_one_from_dataset(swept, tmp_path):
    data = tmp_path / "mine.jsonl"
    shutil.copy(smoke_path(), data)
    db = tmp_path / "r.db"
    ran = ttscale("eval", "--dataset", str(data), "--replay", str(swept["bank"]), "--db", str(db), "--no-progress",
                  "--strategy", "single")
    assert ran.returncode == 0, ran.stderr
    here = ttscale("export", "--db", str(db), "--output", str(tmp_path / "here"))  # the file where it was read
    assert here.returncode == 0 and "could not be loaded" not in here.stderr, here.stderr
    problems = {p.id: p for p in load_dataset(str(data)).problems}
    assert all(json.loads(x)["prompt"] == problems[json.loads(x)["problem_id"]].prompt
               for x in (tmp_path / "here" / SAMPLES_FILE).read_text().splitlines())
    moved = tmp_path / "elsewhere.jsonl"
    data.rename(moved)
    proc = ttscale("export", "--db", str(db), "--output", str(tmp_path / "a"))
    assert proc.returncode == 0 and "could not be loaded again" in proc.stderr
    minimal = [json.loads(x) for x in (tmp_path / "a" / SAMPLES_FILE).read_text().splitlines()]
    assert all(s["prompt"] is None and s["doc"] == {"id": s["problem_id"]} for s in minimal)
    proc = ttscale("export", "--db", str(db), "--output", str(tmp_path / "b"), "--dataset", str(moved))
    assert proc.returncode == 0 and "could not be loaded" not in proc.stderr
    full = [json.loads(x) for x in (tmp_path / "b" / SAMPLES_FILE).read_text().splitlines()]
    assert all(s["prompt"] == problems[s["problem_id"]].prompt for s in full)


# ---------------------------------------------------------------------------------------------- tracking


def read_events(path: Path) -> list:
    """Every Event record of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        pos += 12
        out.append(Event.FromString(data[pos:pos + length]))
        pos += length + 4
    return out


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        for ev in read_events(f):
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    found[v.tag].append((ev.step, v.simple_value))
    return found


def test_tensorboard_tracking_writes_each_problem_and_the_run_metrics(swept):
    results = ResultsFile.model_validate_json((swept["out"] / RESULTS_FILE).read_text())
    n = len(load_dataset("smoke"))
    assert sorted(p.name for p in swept["tb"].iterdir()) == sorted(results.configs)
    for run_id, metrics in results.results.items():
        got = scalars(swept["tb"] / run_id)
        assert [step for step, _ in got["problem/generated_tokens"]] == list(range(1, n + 1))
        final_acc = got["problem/accuracy"][-1][1]
        assert final_acc == pytest.approx(metrics.accuracy, abs=1e-6)
        assert got["summary/accuracy"] == [(0, pytest.approx(metrics.accuracy, abs=1e-6))]
        assert got["summary/mean_total_tokens"][0][1] == pytest.approx(metrics.mean_total_tokens, rel=1e-6)
        for k, v in metrics.pass_at_k.items():
            assert got[f"summary/pass_at_{k}"][0][1] == pytest.approx(v, abs=1e-6)
        assert set(metrics.maj_at_k) == {t.removeprefix("summary/maj_at_") for t in got if "maj_at_" in t}


def test_an_unknown_tracker_is_bad_input_with_a_suggestion(tmp_path):
    proc = ttscale("eval", "--dataset", "smoke", "--db", str(tmp_path / "r.db"), "--no-progress",
                   "--track", "tensorbord:x")
    assert proc.returncode == 2 and "did you mean 'tensorboard'?" in proc.stderr, proc.stderr
