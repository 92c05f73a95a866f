"""Pipeline call over HTTP vs raw httpx vs the official openai SDK, side by side against one local fake server.

    python benchmarks/bench_http.py [--rounds 21] [--calls 200]

Ours: `Pipeline.run` through the openai provider with the retry, circuit breaker (shared diskcache state)
and cost layers on, the response cache off, no faults. Raw: `httpx.Client.post` of the same JSON body,
decoding the answer's text. SDK: `openai.OpenAI(...).chat.completions.create` with the same arguments.
The contenders alternate within each round (in rotating order), so machine load hits them alike; the
table gives the median over rounds of the per-call mean wall time, the median of the per-round ratios,
and this process's CPU time per call (the server runs in its own process; on a busy machine the CPU
column is the steadier measure of what each client costs).
Goals (issue 2): ours / raw <= 1.15; ours faster than the SDK.
A fourth row, ours with a (large) total budget, shows what budget accounting adds: two diskcache
transactions a call (reserve, settle).
"""
from __future__ import annotations
import argparse, json, statistics, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fakeserver import start_server, stop_server  # noqa: E402


def settings_for(tmp:Path, url:str, **extra):
    from promptsys.config import load_settings
    ov = {"promptsys.state_dir": str(tmp / "state"), "cache.dir": str(tmp / "cache"), "cache.enabled": "false",
          "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db", "monitor.db_path": str(tmp / "metrics.db"),
          "model.provider": "openai", "openai.base_url": url + "/v1", "openai.model": "gpt-4o-mini",
          "openai.api_key_env": "PROMPTSYS_BENCH_KEY", "promptsys.mode": "strict", **extra}
    return load_settings(ROOT / "settings.ini", overrides=ov, env={})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--calls", type=int, default=200, help="calls per contender per round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_http.json"))
    args = ap.parse_args(argv)
    import os
    import httpx, openai
    from promptsys.pipeline import Pipeline
    from promptsys.providers import Request
    os.environ["PROMPTSYS_BENCH_KEY"] = "sk-bench-not-a-real-key"
    tmp = Path(tempfile.mkdtemp(prefix="bench_http_"))
    proc, url = start_server()
    try:
        text = "I love this kettle, it boils fast and looks great."
        ours = Pipeline("sentiment", 1, settings=settings_for(tmp, url))
        budgeted = Pipeline("sentiment", 1, settings=settings_for(tmp, url, **{"budget.total_usd": 1e6}))
        prov = ours.provider
        body = prov.body(Request([{"role": "user", "content": ours.prompt.render(text=text)}], "", ours.max_tokens, ours.temperature, ours.seed, ours.task.output))
        raw = httpx.Client(headers={"authorization": "Bearer " + os.environ["PROMPTSYS_BENCH_KEY"]})
        sdk = openai.OpenAI(base_url=url + "/v1", api_key=os.environ["PROMPTSYS_BENCH_KEY"], max_retries=0)
        endpoint = url + "/v1/chat/completions"

        def run_ours(): return ours.run(text).label
        def run_budget(): return budgeted.run(text).label
        def run_raw():
            r = raw.post(endpoint, json=body); r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]
        def run_sdk(): return sdk.chat.completions.create(**body).choices[0].message.content

        contenders = {"ours": run_ours, "raw httpx": run_raw, "openai SDK": run_sdk, "ours + budget": run_budget}
        for fn in contenders.values():           # warm up connections, caches, lazy imports
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
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))
        res = {
            "benchmark": "bench_http", "rounds": args.rounds, "calls_per_round": args.calls,
            "median_ms_per_call": {k: round(v, 4) for k, v in med.items()},
            "median_client_cpu_ms_per_call": {k: round(v, 4) for k, v in cpu.items()},
            "ratio_ours_raw": round(ratio("ours", "raw httpx"), 3),
            "ratio_ours_sdk": round(ratio("ours", "openai SDK"), 3),
            "ratio_sdk_raw": round(ratio("openai SDK", "raw httpx"), 3),
            "ratio_budget_raw": round(ratio("ours + budget", "raw httpx"), 3),
            "goal_ours_raw": 1.15, "goal_ours_sdk": "< 1",
        }
        res["pass"] = res["ratio_ours_raw"] <= 1.15 and res["ratio_ours_sdk"] < 1
        print(f"{'contender':<16}{'median ms/call':>16}{'x raw':>8}{'client cpu ms/call':>20}")
        for k in names:
            print(f"{k:<16}{med[k]:>16.3f}{ratio(k, 'raw httpx') if k != 'raw httpx' else 1.0:>8.2f}{cpu[k]:>20.3f}")
        print(f"ours / raw = {res['ratio_ours_raw']:.3f} (goal <= 1.15); ours / SDK = {res['ratio_ours_sdk']:.3f} "
              f"(goal < 1) -> {'PASS' if res['pass'] else 'MISS'}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        raw.close(); sdk.close()
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
