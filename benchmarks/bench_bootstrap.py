"""The gate's paired bootstrap: `promotion.bootstrap_ci` (numpy) vs the pure-Python loop it replaced, at n = 5,000
paired examples and the default 2,000 resamples (goal: <= 0.5 s).

    python benchmarks/bench_bootstrap.py [--n 5000] [--n-boot 2000] [--repeats 5]

The contenders alternate (no order bias); medians over the repeats. Also checks that `bootstrap_ci` gives the
identical interval as a pure-Python loop over the same numpy draws (`_reference`, as in nbs/17_promotion.ipynb).
"""
from __future__ import annotations
import argparse, json, math, random, statistics as st, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from promptsys.promotion import bootstrap_ci  # noqa: E402


def before(diffs, n_boot=2000, alpha=0.05, seed=0):
    "The implementation up to issue 6: random.Random, a Python sum per resample."
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(max(1, n_boot)))
    return means[int(math.floor(alpha / 2 * (len(means) - 1)))], means[int(math.ceil((1 - alpha / 2) * (len(means) - 1)))]


def _reference(diffs, n_boot=2000, alpha=0.05, seed=0):
    "`bootstrap_ci` as a pure-Python loop over the same numpy draws."
    import numpy as np
    n, rng = len(diffs), np.random.default_rng(seed)
    means = sorted(sum(diffs[i] for i in rng.integers(0, n, n).tolist()) / n for _ in range(max(1, n_boot)))
    k = len(means)
    return means[int(math.floor(alpha / 2 * (k - 1)))], means[int(math.ceil((1 - alpha / 2) * (k - 1)))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_bootstrap.json"))
    a = ap.parse_args(argv)
    r = random.Random(1)
    diffs = [r.choice([-1, 0, 0, 0, 1]) for _ in range(a.n)]        # 0/1 scores: paired differences
    times = {"numpy": [], "pure python (before)": []}
    for i in range(a.repeats):
        order = [("numpy", bootstrap_ci), ("pure python (before)", before)]
        for name, f in (order if i % 2 == 0 else order[::-1]):
            t = time.perf_counter(); f(diffs, a.n_boot); times[name].append(time.perf_counter() - t)
    same = bootstrap_ci(diffs, a.n_boot) == _reference(diffs, a.n_boot)
    med = {k: st.median(v) for k, v in times.items()}
    res = dict(benchmark="bench_bootstrap", n=a.n, n_boot=a.n_boot, repeats=a.repeats,
               seconds={k: [round(x, 4) for x in v] for k, v in times.items()},
               median_seconds={k: round(v, 4) for k, v in med.items()},
               speedup=round(med["pure python (before)"] / med["numpy"], 1), goal_seconds=0.5,
               identical_to_reference=same, interval=bootstrap_ci(diffs, a.n_boot))
    print(json.dumps(res, indent=1))
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if same and med["numpy"] <= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
