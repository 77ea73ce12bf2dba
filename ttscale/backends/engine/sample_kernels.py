"""Fused, sort-free sampling on CUDA (Triton): the same draws as `sampler.sample`'s torch path.

Every pass over the logits runs on a grid of (row, 1,024-token chunk) programs, so one row is as
parallel as a batch; per-row programs only combine the chunks' partial results. Weights are
`w = exp((x - max x) / T)` (the unnormalised softmax at temperature T; the largest is exactly 1).

Unfiltered rows (2 launches): chunk statistics (max, argmax, min, sum of exp at T=1 and at T), then one
program per row combines them (max, log-sum-exp, chunk masses) and draws by a two-level inverse CDF:
the chunk from the chunk masses, the token from a scan of that one chunk.

Filtered rows (top-p and/or top-k; 12 launches, no sort of the vocabulary): the threshold `tau` is the
largest weight t with `mass(w >= t) >= top_p * total` or `count(w >= t) >= top_k`. It is bracketed on the
int32 bit pattern of the weight (monotone for w >= 0): up to `LEVELS` passes each evaluate `K` thresholds
spread over the bracket (mass and count of w >= threshold per chunk, summed per row) and keep the
sub-interval holding tau. A row whose bracket holds at most `SMALL` weights is settled: later passes skip
it (a peaked row, as from a trained model, settles after one; a near-flat row, as from random weights,
needs them all: with 17 x 17 parts its bracket held hundreds to thousands of weights, sorted at up to
`CAP` in one program, and its gather's atomics contended). Four passes of 8 thresholds (9^4 parts) cost
less than three of 16 (17^3): a pass's cost grows faster than K (H200, 512 x 151,936 rows, in a CUDA
graph: 1.32 ms instead of 1.95 flat, 0.75 instead of 0.99 peaked; `benchmarks/sampler_bench.py
--variants`). A last pass gathers the weights left inside the
bracket and the per-chunk mass above it; one program per row sorts the gathered weights (a 128-wide
sort when they are that few, else up to `CAP`), finds the exact tau among them, adds the gathered
weights >= tau to their chunks' masses and draws as above with the mask `w >= tau`. More than `CAP`
weights in the bracket (near-ties) fall back to an exact bisection in that row's program: slow, but
still exact.

Capturable in a CUDA graph: fixed grids, no host synchronisation; scratch comes from `torch.empty`.
On CPU the tests run these kernels through Triton's interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttscale.backends.engine.precompile import launch

CHUNK = 1024  # tokens per program in the passes over the logits (fixed: a row's draw never depends on B)
K = 8  # thresholds per bracketing pass
LEVELS = 4  # bracketing passes before the gather (at most: settled rows skip the rest)
LEVEL_SUB = 128  # logits a bracketing program reads at once (of its CHUNK; 256 and all 1,024 timed slower)
LEVEL_WARPS = 4
LEVEL_KMAJOR = True  # thresholds x logits tile with the logits along the fast axis (see `_level`)
CAP = 2048  # weights a row's final program sorts at most
SMALL = 128  # ... and the narrower sort it uses when they are few (the usual case)
SETTLE_AT = SMALL  # a bracket holding this many weights or fewer is settled, at most SMALL (-1: never; for A/B timing)
ONE_BITS = tl.constexpr(0x3F800000)  # bit pattern of 1.0, the largest weight
_NI = tl.constexpr(8)  # int32 state per row: active, lo, hi, count above hi, gathered, min and max gathered bits,
# count at or above lo
_NF = 4  # float32 state per row: max logit, 1 / T, target mass, mass above hi

_GOLD = tl.constexpr(0x9E3779B97F4A7C15)  # splitmix64, as `sampler.uniform`
_C1 = tl.constexpr(0xBF58476D1CE4E5B9)
_C2 = tl.constexpr(0x94D049BB133111EB)
_C3 = tl.constexpr(0xD1B54A32D192ED03)


@triton.jit
def _mix(z):
    z = (z ^ (z >> 30)) * _C1
    z = (z ^ (z >> 27)) * _C2
    return z ^ (z >> 31)


@triton.jit
def _uniform(seed, step):
    """`sampler.uniform` for one row: splitmix64 of (seed, step), a float32 in (0, 1)."""
    z = _mix(seed.to(tl.uint64, bitcast=True) * _GOLD + step.to(tl.uint64, bitcast=True) * _C3 + _GOLD)
    z = _mix(z + _GOLD)
    return (((z >> 40).to(tl.float64) + 0.5) / 16777216.0).to(tl.float32)


@triton.jit
def _weights(x, xmax, inv_t):
    return tl.exp((x.to(tl.float32) - xmax) * inv_t)


@triton.jit
def _inv_temperature(TEMP, b):
    return 1.0 / tl.maximum(tl.load(TEMP + b), 1e-5)


@triton.jit
def _chunk_stats(L, TEMP, STATS, V, C, CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    i = c * CHUNK + tl.arange(0, CHUNK)
    ok = i < V
    x = tl.load(L + b * V + i, mask=ok, other=float("-inf")).to(tl.float32)
    inv_t = _inv_temperature(TEMP, b)
    cmax = tl.max(x, 0)
    shift = tl.where(cmax == float("-inf"), 0.0, cmax)
    base = STATS + b * 5 * C + c
    tl.store(base, cmax)
    tl.store(base + C, (c * CHUNK + tl.argmax(x, 0)).to(tl.float32))
    tl.store(base + 2 * C, tl.min(tl.where(ok, x, float("inf")), 0))
    tl.store(base + 3 * C, tl.sum(tl.exp(x - shift), 0))
    tl.store(base + 4 * C, tl.sum(tl.exp((x - shift) * inv_t), 0))


@triton.jit
def _row_combine(STATS, b, C, inv_t, C_POW2: tl.constexpr):
    """A row's max logit, first argmax, log-sum-exp (T=1), per-chunk weight masses `[C_POW2]`, min logit."""
    c = tl.arange(0, C_POW2)
    ok = c < C
    base = STATS + b * 5 * C
    cmax = tl.load(base + c, mask=ok, other=float("-inf"))
    carg = tl.load(base + C + c, mask=ok, other=0.0)
    xmin = tl.min(tl.load(base + 2 * C + c, mask=ok, other=float("inf")), 0)
    s1 = tl.load(base + 3 * C + c, mask=ok, other=0.0)
    st = tl.load(base + 4 * C + c, mask=ok, other=0.0)
    xmax = tl.max(cmax, 0)
    arg = tl.sum(tl.where(c == tl.argmax(cmax, 0), carg, 0.0), 0).to(tl.int64)
    rel = tl.where(ok, cmax - xmax, float("-inf"))
    lse = xmax + tl.log(tl.sum(s1 * tl.exp(rel), 0))
    return xmax, arg, lse, st * tl.exp(rel * inv_t), xmin


@triton.jit
def _row_init(STATS, TEMP, TOPP, TOPK, ROWF, ROWI, V, C, C_POW2: tl.constexpr):
    """Bracket [lo, hi] (weight bits) around tau: lo = the smallest weight, or (1 - top_p) / 2 of the mean
    weight when larger (the weights below it hold less than 1 - top_p of the mass); hi = 1.0."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(TEMP + b)
    inv_t = _inv_temperature(TEMP, b)
    p = tl.load(TOPP + b)
    k = tl.load(TOPK + b)
    xmax, arg, lse, mass, xmin = _row_combine(STATS, b, C, inv_t, C_POW2)
    total = tl.sum(mass, 0)
    active = (t > 0) & ((p < 1.0) | (k > 0))
    lb = tl.where(p < 1.0, 0.5 * (1.0 - p) * total / V, 0.0)
    lo = tl.maximum(_weights(xmin, xmax, inv_t), lb).to(tl.int32, bitcast=True)
    f = ROWF + b * 4
    tl.store(f, xmax)
    tl.store(f + 1, inv_t)
    tl.store(f + 2, tl.where(p < 1.0, p * total, float("inf")))
    tl.store(f + 3, 0.0)
    r = ROWI + b * _NI
    tl.store(r, active.to(tl.int32))
    tl.store(r + 1, lo)
    tl.store(r + 2, ONE_BITS)
    tl.store(r + 3, 0)
    tl.store(r + 4, 0)
    tl.store(r + 5, 2147483647)
    tl.store(r + 6, -1)
    tl.store(r + 7, 2147483647)


@triton.jit
def _count_bound(k):
    """top_k as the count a threshold must reach (never reached when top_k <= 0)."""
    return tl.where(k > 0, k, 1 << 62)


@triton.jit
def _thresholds(lo, hi, K: tl.constexpr):
    """K thresholds `lo + j * step` (j = 1..K) splitting [lo, hi] into K + 1 parts; (step, int64 thresholds,
    valid mask)."""
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    step = (hi - lo + K + 1) // (K + 1)
    thr = lo + (tl.arange(0, K) + 1).to(tl.int64) * step
    return step, thr, thr <= hi


@triton.jit
def _unsettled(r, SETTLED: tl.constexpr):
    """Active and its bracket still holds more than SETTLED weights."""
    return (tl.load(r) != 0) & (tl.load(r + 7) - tl.load(r + 3) > SETTLED)


@triton.jit
def _level(L, ROWF, ROWI, PG, PN, V, C, CHUNK: tl.constexpr, K: tl.constexpr, SUB: tl.constexpr,
           SETTLED: tl.constexpr, KMAJOR: tl.constexpr):
    """Per (row, chunk): mass and count of weights >= each of the row's K thresholds.

    `KMAJOR` lays the [thresholds x logits] tile out with the logits along the fast axis: each thread then
    owns whole columns (one logit, all K thresholds), so a logit is loaded and exponentiated once; with the
    thresholds along the fast axis, K threads shared each logit and each computed its exp."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    r = ROWI + b * _NI
    if _unsettled(r, SETTLED):
        xmax = tl.load(ROWF + b * 4)
        inv_t = tl.load(ROWF + b * 4 + 1)
        _, thr, valid = _thresholds(tl.load(r + 1), tl.load(r + 2), K)
        thr32 = tl.where(valid, thr, 2147483647).to(tl.int32)
        out = (b * C + c) * K + tl.arange(0, K)
        if KMAJOR:
            acc_g = tl.zeros([K, SUB], dtype=tl.float32)
            acc_n = tl.zeros([K, SUB], dtype=tl.int32)
            for s in range(0, CHUNK, SUB):
                i = c * CHUNK + s + tl.arange(0, SUB)
                w = _weights(tl.load(L + b * V + i, mask=i < V, other=float("-inf")), xmax, inv_t)
                ge = w.to(tl.int32, bitcast=True)[None, :] >= thr32[:, None]
                acc_g += tl.where(ge, w[None, :], 0.0)
                acc_n += ge.to(tl.int32)
            tl.store(PG + out, tl.sum(acc_g, 1))
            tl.store(PN + out, tl.sum(acc_n, 1))
        else:
            acc_g = tl.zeros([SUB, K], dtype=tl.float32)
            acc_n = tl.zeros([SUB, K], dtype=tl.int32)
            for s in range(0, CHUNK, SUB):
                i = c * CHUNK + s + tl.arange(0, SUB)
                w = _weights(tl.load(L + b * V + i, mask=i < V, other=float("-inf")), xmax, inv_t)
                ge = w.to(tl.int32, bitcast=True)[:, None] >= thr32[None, :]
                acc_g += tl.where(ge, w[:, None], 0.0)
                acc_n += ge.to(tl.int32)
            tl.store(PG + out, tl.sum(acc_g, 0))
            tl.store(PN + out, tl.sum(acc_n, 0))


@triton.jit
def _row_level(ROWF, ROWI, TOPK, PG, PN, C, K: tl.constexpr, C_POW2: tl.constexpr, SETTLED: tl.constexpr):
    """Keep the part of the bracket holding tau: the largest threshold where the predicate holds."""
    b = tl.program_id(0).to(tl.int64)
    r = ROWI + b * _NI
    if _unsettled(r, SETTLED):
        lo = tl.load(r + 1)
        hi = tl.load(r + 2)
        step, thr, valid = _thresholds(lo, hi, K)
        k = _count_bound(tl.load(TOPK + b))
        c = tl.arange(0, C_POW2)[:, None]
        j = tl.arange(0, K)
        at = (b * C + c) * K + j[None, :]
        g = tl.sum(tl.load(PG + at, mask=c < C, other=0.0), 0)
        n = tl.sum(tl.load(PN + at, mask=c < C, other=0), 0)
        pred = valid & ((g >= tl.load(ROWF + b * 4 + 2)) | (n >= k))
        jstar = tl.max(tl.where(pred, j + 1, 0), 0)
        nxt = valid & (j == jstar)
        has_next = tl.sum(nxt.to(tl.int32), 0) > 0
        tl.store(r + 1, (lo.to(tl.int64) + jstar.to(tl.int64) * step).to(tl.int32))
        tl.store(r + 2, tl.where(has_next, tl.sum(tl.where(nxt, thr, 0), 0) - 1, hi.to(tl.int64)).to(tl.int32))
        tl.store(r + 3, tl.where(has_next, tl.sum(tl.where(nxt, n, 0), 0), tl.load(r + 3)))
        tl.store(r + 7, tl.where(jstar > 0, tl.sum(tl.where(j + 1 == jstar, n, 0), 0), tl.load(r + 7)))
        tl.store(ROWF + b * 4 + 3, tl.where(has_next, tl.sum(tl.where(nxt, g, 0.0), 0), tl.load(ROWF + b * 4 + 3)))


@triton.jit
def _gather(L, ROWF, ROWI, A, CE, CI, V, C, CHUNK: tl.constexpr, CAP: tl.constexpr):
    """Per (row, chunk): the mass of weights above the bracket, and the weights inside it (appended to
    the row's candidate list)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    r = ROWI + b * _NI
    if tl.load(r) != 0:
        lo = tl.load(r + 1)
        hi = tl.load(r + 2)
        i = c * CHUNK + tl.arange(0, CHUNK)
        ok = i < V
        w = _weights(tl.load(L + b * V + i, mask=ok, other=float("-inf")), tl.load(ROWF + b * 4),
                     tl.load(ROWF + b * 4 + 1))
        bits = w.to(tl.int32, bitcast=True)
        tl.store(A + b * C + c, tl.sum(tl.where(ok & (bits > hi), w, 0.0), 0))
        inside = ok & (bits >= lo) & (bits <= hi)
        n = tl.sum(inside.to(tl.int32), 0)
        if n > 0:
            base = tl.atomic_add(r + 4, n)
            slot = base + tl.cumsum(inside.to(tl.int32), 0) - 1
            keep = inside & (slot < CAP)
            tl.store(CE + b * CAP + slot, w, mask=keep)
            tl.store(CI + b * CAP + slot, i, mask=keep)
            tl.atomic_min(r + 5, tl.min(tl.where(inside, bits, 2147483647), 0))
            tl.atomic_max(r + 6, tl.max(tl.where(inside, bits, -1), 0))


@triton.jit
def _mass_from(L, b, V, C, xmax, inv_t, tbits, CHUNK: tl.constexpr, C_POW2: tl.constexpr):
    """Per-chunk mass and total count of the weights whose bits are >= tbits (a scan of the whole row)."""
    cr = tl.arange(0, C_POW2)
    mass = tl.zeros([C_POW2], dtype=tl.float32)
    cnt = tl.zeros([], dtype=tl.int32)
    for c in range(0, C):
        i = c * CHUNK + tl.arange(0, CHUNK)
        w = _weights(tl.load(L + b * V + i, mask=i < V, other=float("-inf")), xmax, inv_t)
        ge = (i < V) & (w.to(tl.int32, bitcast=True) >= tbits)
        mass += tl.where(cr == c, tl.sum(tl.where(ge, w, 0.0), 0), 0.0)
        cnt += tl.sum(ge.to(tl.int32), 0)
    return mass, cnt


@triton.jit
def _tau_among(CE, ROWF, r, b, n, k, target, CAP: tl.constexpr, SIZE: tl.constexpr):
    """tau from a row's n <= SIZE gathered weights: sorted descending, the first where the mass (or count)
    from the top, including everything above the bracket, reaches the target."""
    q = tl.arange(0, SIZE)
    sv = tl.sort(tl.load(CE + b * CAP + q, mask=q < n, other=-1.0), descending=True)
    cum = tl.load(ROWF + b * 4 + 3) + tl.cumsum(sv, 0)
    pred = (q < n) & ((cum >= target) | (tl.load(r + 3) + q + 1 >= k))
    m = tl.min(tl.where(pred, q, n - 1), 0)
    return tl.where(n > 0, tl.sum(tl.where(q == m, sv, 0.0), 0), tl.load(r + 1).to(tl.float32, bitcast=True))


@triton.jit
def _final(L, STATS, TEMP, TOPP, TOPK, SEED, STEP, ROWF, ROWI, A, CE, CI, TOK, LP, LSE, TAU, V, C,
           CHUNK: tl.constexpr, C_POW2: tl.constexpr, CAP: tl.constexpr, SMALL: tl.constexpr, CB: tl.constexpr,
           FILTERED: tl.constexpr):
    """One program per row: tau (filtered rows), then the draw, its logprob and the row's log-sum-exp."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(TEMP + b)
    inv_t = _inv_temperature(TEMP, b)
    xmax, arg, lse, mass, xmin = _row_combine(STATS, b, C, inv_t, C_POW2)
    cr = tl.arange(0, C_POW2)
    okc = cr < C
    tau = tl.zeros([], dtype=tl.float32)
    if FILTERED:
        r = ROWI + b * _NI
        if tl.load(r) != 0:
            k = _count_bound(tl.load(TOPK + b))
            target = tl.load(ROWF + b * 4 + 2)
            n = tl.load(r + 4)
            if n <= CAP:
                if n <= SMALL:
                    tau = _tau_among(CE, ROWF, r, b, n, k, target, CAP, SMALL)
                else:
                    tau = _tau_among(CE, ROWF, r, b, n, k, target, CAP, CAP)
                extra = tl.zeros([C_POW2], dtype=tl.float32)
                for off in range(0, n, CB):
                    q2 = off + tl.arange(0, CB)
                    okq = q2 < n
                    wv = tl.load(CE + b * CAP + q2, mask=okq, other=0.0)
                    ch = tl.load(CI + b * CAP + q2, mask=okq, other=0) // CHUNK
                    wv = tl.where(okq & (wv >= tau), wv, 0.0)
                    extra += tl.sum(tl.where(ch[:, None] == cr[None, :], wv[:, None], 0.0), 0)
                mass = tl.load(A + b * C + cr, mask=okc, other=0.0) + extra
            else:
                lo = tl.maximum(tl.load(r + 1), tl.load(r + 5))
                hi = tl.minimum(tl.load(r + 2), tl.load(r + 6))
                while lo < hi:
                    mid = lo + (hi - lo + 1) // 2
                    g, cnt = _mass_from(L, b, V, C, xmax, inv_t, mid, CHUNK, C_POW2)
                    if (tl.sum(g, 0) >= target) | (cnt >= k):
                        lo = mid
                    else:
                        hi = mid - 1
                tau = lo.to(tl.float32, bitcast=True)
                mass, _ = _mass_from(L, b, V, C, xmax, inv_t, lo, CHUNK, C_POW2)
    mass = tl.where(okc, mass, 0.0)
    cum = tl.cumsum(mass, 0)
    x = _uniform(tl.load(SEED + b), tl.load(STEP + b)) * tl.max(cum, 0)
    ci = tl.sum(tl.where(okc & (cum <= x), 1, 0), 0)
    ci = tl.minimum(ci, tl.max(tl.where(mass > 0, cr, 0), 0))
    x -= tl.sum(tl.where(cr == ci, cum - mass, 0.0), 0)
    ii = tl.arange(0, CHUNK)
    i = ci * CHUNK + ii
    w = _weights(tl.load(L + b * V + i, mask=i < V, other=float("-inf")), xmax, inv_t)
    w = tl.where((i < V) & (w >= tau), w, 0.0)
    pick = tl.sum(tl.where(tl.cumsum(w, 0) <= x, 1, 0), 0)
    pick = tl.minimum(pick, tl.max(tl.where(w > 0, ii, 0), 0))
    tok = tl.where(t > 0, ci.to(tl.int64) * CHUNK + pick, arg)
    tl.store(TOK + b, tok)
    tl.store(LP + b, tl.load(L + b * V + tok).to(tl.float32) - lse)
    tl.store(LSE + b, lse)
    tl.store(TAU + b, tau)


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                 seeds: torch.Tensor, steps: torch.Tensor, filtered: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens int64, logprobs, log-sum-exp, tau) per row of `[B, V]` logits (float32, or bfloat16 /
    float16 read as they are: the same values as `logits.float()`, without that pass); tau is the weight
    threshold of the nucleus (0 for unfiltered rows and without `filtered`)."""
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        logits = logits.float()
    logits = logits.contiguous()
    B, V = logits.shape
    C = triton.cdiv(V, CHUNK)
    c_pow2 = triton.next_power_of_2(C)
    dev = logits.device
    temperature, top_p = temperature.float().contiguous(), top_p.float().contiguous()
    top_k, seeds, steps = (a.long().contiguous() for a in (top_k, seeds, steps))
    stats = torch.empty(B, 5, C, dtype=torch.float32, device=dev)
    rowf = torch.empty(B, _NF, dtype=torch.float32, device=dev)
    rowi = torch.empty(B, _NI.value, dtype=torch.int32, device=dev)
    above = torch.empty(B, C, dtype=torch.float32, device=dev)
    cand_w = torch.empty(B, CAP, dtype=torch.float32, device=dev)
    cand_i = torch.empty(B, CAP, dtype=torch.int32, device=dev)
    tok = torch.empty(B, dtype=torch.int64, device=dev)
    lp, lse, tau = (torch.empty(B, dtype=torch.float32, device=dev) for _ in range(3))
    launch(_chunk_stats, (B, C), logits, temperature, stats, V, C, CHUNK=CHUNK)
    if filtered:
        part_g = torch.empty(B, C, K, dtype=torch.float32, device=dev)
        part_n = torch.empty(B, C, K, dtype=torch.int32, device=dev)
        launch(_row_init, (B,), stats, temperature, top_p, top_k, rowf, rowi, V, C, C_POW2=c_pow2)
        settled = min(SETTLE_AT, SMALL)
        for _ in range(LEVELS):
            launch(_level, (B, C), logits, rowf, rowi, part_g, part_n, V, C, CHUNK=CHUNK, K=K, SUB=LEVEL_SUB,
                   SETTLED=settled, KMAJOR=LEVEL_KMAJOR, num_warps=LEVEL_WARPS)
            launch(_row_level, (B,), rowf, rowi, top_k, part_g, part_n, C, K=K, C_POW2=c_pow2, SETTLED=settled)
        launch(_gather, (B, C), logits, rowf, rowi, above, cand_w, cand_i, V, C, CHUNK=CHUNK, CAP=CAP)
    launch(_final, (B,), logits, stats, temperature, top_p, top_k, seeds, steps, rowf, rowi, above, cand_w,
           cand_i, tok, lp, lse, tau, V, C, CHUNK=CHUNK, C_POW2=c_pow2, CAP=CAP, SMALL=min(SMALL, CAP),
           CB=max(16, min(64, 4096 // c_pow2)), FILTERED=filtered, num_warps=8)
    return tok, lp, lse, tau


@triton.jit
def _weights_kernel(L, TEMP, STATS, W, V, C, CHUNK: tl.constexpr, C_POW2: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    inv_t = _inv_temperature(TEMP, b)
    xmax, _, _, _, _ = _row_combine(STATS, b, C, inv_t, C_POW2)
    i = c * CHUNK + tl.arange(0, CHUNK)
    tl.store(W + b * V + i, _weights(tl.load(L + b * V + i, mask=i < V, other=0.0), xmax, inv_t), mask=i < V)


def weights(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """The weights `exp((x - max x) / T)` exactly as the fused kernels compute them (tests use them for
    reference thresholds)."""
    logits = logits.float().contiguous()
    B, V = logits.shape
    C = triton.cdiv(V, CHUNK)
    temperature = temperature.float().contiguous()
    stats = torch.empty(B, 5, C, dtype=torch.float32, device=logits.device)
    out = torch.empty_like(logits)
    launch(_chunk_stats, (B, C), logits, temperature, stats, V, C, CHUNK=CHUNK)
    launch(_weights_kernel, (B, C), logits, temperature, stats, out, V, C, CHUNK=CHUNK,
           C_POW2=triton.next_power_of_2(C))
    return out


def sample(logits: torch.Tensor, st, filtered: bool, n_top: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`sampler.sample` through the fused kernels (`st`: a `sampler.SamplingTensors`)."""
    if logits.shape[0] == 0:
        from ttscale.backends.engine.sampler import sample_torch

        return sample_torch(logits, st, filtered, n_top)
    tok, lp, lse, _ = fused_sample(logits, st.temperature, st.top_p, st.top_k, st.seeds, st.steps, filtered)
    if n_top:
        tl_, ti = logits.topk(n_top, -1)
        return tok, lp, ti, tl_.float() - lse[:, None]
    return tok, lp, None, None
