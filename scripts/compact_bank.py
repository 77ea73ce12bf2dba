"""Shrink a recorded trace bank so it can be committed: drop per-token logprobs, merge deltas.

    python scripts/compact_bank.py RAW.jsonl|RAW.db [RAW2 ...] OUT.jsonl --chunk 8

Several raw banks are merged into one (their problem ids must differ; the first one's bank id is kept).

Each trace keeps its text, its status and finish reason, and its token count; consecutive deltas are
merged into deltas of about `chunk` tokens, stamped with the last merged delta's time and order, so a
replay sees the same text at the same times, only in coarser steps. Token ids are dropped too (the count
stays in `num_tokens`); a strategy that needs logprobs or token ids cannot replay the compact bank.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ttscale.evals.bank import RecordedDelta, RecordedTrace, TraceBank


def merge_deltas(deltas: list[RecordedDelta], chunk: int) -> list[RecordedDelta]:
    """Consecutive deltas merged into groups of at least `chunk` tokens (the last group may be smaller)."""
    out: list[RecordedDelta] = []
    group: list[RecordedDelta] = []

    def flush() -> None:
        last = group[-1]
        out.append(RecordedDelta(
            text="".join(d.text for d in group), num_tokens=sum(d.n_tokens for d in group),
            finished=last.finished, finish_reason=last.finish_reason, error=last.error,
            prompt_tokens=next((d.prompt_tokens for d in group if d.prompt_tokens is not None), None),
            t=last.t, seq=last.seq))
        group.clear()

    for d in deltas:
        group.append(d)
        if sum(g.n_tokens for g in group) >= chunk or d.finished:
            flush()
    if group:
        flush()
    return out


def compact(trace: RecordedTrace, chunk: int) -> dict:
    slim = trace.model_copy(update={"deltas": merge_deltas(trace.deltas, chunk), "request_id": ""})
    return slim.model_dump(exclude_defaults=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="+")
    ap.add_argument("dst")
    ap.add_argument("--chunk", type=int, default=8, help="tokens per merged delta")
    args = ap.parse_args()
    banks = [TraceBank(src) for src in args.src]
    meta = {**banks[0].meta, "compacted": f"chunk={args.chunk}",
            "sources": [{k: b.meta.get(k) for k in ("bank_id", "backend", "dataset")} for b in banks]}
    lines = [json.dumps({"ttscale_bank": 1, "meta": meta})]
    seen: set[str] = set()
    for bank in banks:
        for pid, traces in bank.load_all().items():
            if pid in seen:
                raise SystemExit(f"problem {pid!r} is in more than one source bank")
            seen.add(pid)
            problem = bank.problems()[pid]
            lines.append(json.dumps({"problem": problem.model_dump(exclude_defaults=True),
                                     "traces": [compact(t, args.chunk) for t in traces]}, ensure_ascii=False))
        bank.close()
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    Path(args.dst).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.dst}: {len(lines) - 1} problems, {Path(args.dst).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
