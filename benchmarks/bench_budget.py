"""P2b: a pipeline call under a budget vs raw httpx, side by side against one local fake server.

    python benchmarks/bench_budget.py [--rounds 21] [--calls 200]

Contenders, interleaved within each round (rotating order) so machine load hits them alike:
- raw httpx: `httpx.Client.post` of the same JSON body, decoding the answer's text;
- ours: `Pipeline.run` through the openai provider (retry, breaker, cost layers on; cache off), no budget;
- ours + budget (lease): the same with `[budget] total_usd` set — each process leases a slice of the budget
  in one ledger transaction and spends it in memory (the default, `lease_seconds = 2`);
- ours + budget (per call): `lease_seconds = 0`, the old way — two ledger transactions a call (reserve, settle).
The table gives the median over rounds of the per-call mean wall time, the median of the per-round ratios
to raw, and this process's CPU time per call. Goal (issue 6, P2b): ours + budget / raw <= 1.15.
"""
from __future__ import annotations
import argparse, json, os, statistics, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fakeserver import start_server, stop_server  # noqa: E402
from benchmarks.bench_http import settings_for  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--calls", type=int, default=200, help="calls per contender per round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_budget.json"))
    args = ap.parse_args(argv)
    import httpx
    from promptsys.pipeline import Pipeline
    from promptsys.providers import Request
    os.environ["PROMPTSYS_BENCH_KEY"] = "sk-bench-not-a-real-key"
    tmp = Path(tempfile.mkdtemp(prefix="bench_budget_"))
    proc, url = start_server()
    try:
        text = "I love this kettle, it boils fast and looks great."
        ours = Pipeline("sentiment", 1, settings=settings_for(tmp / "a", url))
        lease = Pipeline("sentiment", 1, settings=settings_for(tmp / "b", url, **{"budget.total_usd": 1e6}))
        per_call = Pipeline("sentiment", 1, settings=settings_for(tmp / "c", url, **{"budget.total_usd": 1e6,
                                                                                    "budget.lease_seconds": 0}))
        body = ours.provider.body(Request([{"role": "user", "content": ours.prompt.render(text=text)}], "",
                                          ours.max_tokens, ours.temperature, ours.seed, ours.task.output))
        raw = httpx.Client(headers={"authorization": "Bearer " + os.environ["PROMPTSYS_BENCH_KEY"]})
        endpoint = url + "/v1/chat/completions"

        def run_raw():
            r = raw.post(endpoint, json=body); r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]
        contenders = {"raw httpx": run_raw, "ours": lambda: ours.run(text).label,
                      "ours + budget (lease)": lambda: lease.run(text).label,
                      "ours + budget (per call)": lambda: per_call.run(text).label}
        for fn in contenders.values():           # warm up connections, caches, lazy imports, the price table
            for _ in range(50): assert fn() == "positive"
        per_round = {k: [] for k in contenders}
        cpu_round = {k: [] for k in contenders}
        names = list(contenders)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                fn = contenders[k]
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(args.calls): fn()
                per_round[k].append((time.perf_counter() - t0) / args.calls * 1e3)
                cpu_round[k].append((time.process_time() - c0) / args.calls * 1e3)
        med = {k: statistics.median(v) for k, v in per_round.items()}
        cpu = {k: statistics.median(v) for k, v in cpu_round.items()}
        ratio = lambda a, b="raw httpx": statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))
        spent = lease.budget.spent()["global:total"]
        res = {
            "benchmark": "bench_budget (P2b)", "rounds": args.rounds, "calls_per_round": args.calls,
            "median_ms_per_call": {k: round(v, 4) for k, v in med.items()},
            "median_client_cpu_ms_per_call": {k: round(v, 4) for k, v in cpu.items()},
            "ratio_ours_raw": round(ratio("ours"), 3),
            "ratio_budget_lease_raw": round(ratio("ours + budget (lease)"), 3),
            "ratio_budget_per_call_raw": round(ratio("ours + budget (per call)"), 3),
            "lease_spent_usd": round(spent, 6),
            "goal_budget_raw": 1.15,
        }
        res["pass"] = res["ratio_budget_lease_raw"] <= 1.15
        print(f"{'contender':<26}{'median ms/call':>16}{'x raw':>8}{'client cpu ms/call':>20}")
        for k in names:
            print(f"{k:<26}{med[k]:>16.3f}{ratio(k) if k != 'raw httpx' else 1.0:>8.2f}{cpu[k]:>20.3f}")
        print(f"ours + budget (lease) / raw = {res['ratio_budget_lease_raw']:.3f} (goal <= 1.15) -> "
              f"{'PASS' if res['pass'] else 'MISS'}; per call (old way) {res['ratio_budget_per_call_raw']:.3f}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        raw.close()
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
