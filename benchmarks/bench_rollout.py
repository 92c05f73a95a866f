"""Live versions: pipeline calls with a rollout active vs raw httpx (P2), and the caller's latency with shadowing.

    python benchmarks/bench_rollout.py [--rounds 11] [--calls 200]

One fake model server (answers in ~0 ms for the overhead rows, in 20 ms for the shadow rows), one sqlite MLflow
store with the sentiment task's v1 in production and v2 as the candidate. Contenders alternate within each round:

* ours (fixed): `Pipeline("sentiment", 1)`, the issue-2 P2 row (retry, breaker, cost on, cache off);
* ours (alias, canary 50%): `Pipeline("sentiment", "production")` following the live state with a canary of v2
  at 50% of callers (a route key per call), so every call pays the routing;
* raw httpx: `httpx.Client.post` of the same body.
Goal (P2): ours / raw <= 1.15 for both pipelines.

Shadow rows: the caller's p50 / p95 over single-threaded calls (20 ms model) with no rollout, and with 100% of
calls shadowed on v2 through the shadow queue (remote provider: 2 background threads). Then the embedded model
(which shares the caller's CPU): p95 without shadowing, with 100% shadowing and callers back to back, and with
100% shadowing and 100 ms pauses between callers (when shadow work actually runs).
"""
from __future__ import annotations
import argparse, json, statistics, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fakeserver import start_server, stop_server, control  # noqa: E402
from benchmarks.bench_http import settings_for  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_rollout.json"))
    ap.add_argument("--no-local", action="store_true", help="skip the embedded-model shadow rows")
    args = ap.parse_args(argv)
    import os, shutil
    import httpx
    from promptsys.pipeline import Pipeline
    from promptsys.providers import Request
    from promptsys.metrics import percentile
    from promptsys import registry, rollout
    os.environ["PROMPTSYS_BENCH_KEY"] = "sk-bench-not-a-real-key"
    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    shutil.copytree(ROOT / "prompts" / "sentiment", tmp / "prompts" / "sentiment",
                    ignore=shutil.ignore_patterns("README.md", "aliases.json", "audit.jsonl"))
    proc, url = start_server()
    try:
        s = settings_for(tmp, url, **{"promptsys.prompts_dir": str(tmp / "prompts"), "promptsys.records": "none"})
        from promptsys.prompts import load_task
        t = load_task("sentiment", s.promptsys.prompts_dir)
        client = registry.mlflow_client(s)
        registry.ensure_experiment(client, registry.experiment_name(t.name, s), registry.tracking_uri(s))
        rv = registry.register_version(client, registry.prompt_name(t.name, s), t.version(1))
        client.set_prompt_alias(registry.prompt_name(t.name, s), "production", int(rv.version))
        text = "I love this kettle, it boils fast and looks great."
        fixed = Pipeline("sentiment", 1, settings=s)
        live = Pipeline("sentiment", "production", settings=s)
        st = rollout.start("sentiment", 2, 50, settings=s, user="bench")
        live.live.refresh()
        assert live.routes().canary is not None and live.routes().percent == 50
        body = fixed.provider.body(Request([{"role": "user", "content": fixed.prompt.render(text=text)}], "",
                                           fixed.max_tokens, fixed.temperature, fixed.seed, fixed.task.output))
        raw = httpx.Client(headers={"authorization": "Bearer " + os.environ["PROMPTSYS_BENCH_KEY"]})
        endpoint = url + "/v1/chat/completions"
        keys = [f"user-{i}" for i in range(args.calls)]
        def run_fixed():
            for _ in range(args.calls): fixed.run(text)
        def run_live():
            for k in keys: live.run(text, route_key=k)
        def run_raw():
            for _ in range(args.calls): raw.post(endpoint, json=body).raise_for_status()
        contenders = {"ours (fixed version)": run_fixed, "ours (alias, canary 50%)": run_live, "raw httpx": run_raw}
        for fn in contenders.values(): fn()
        per = {k: [] for k in contenders}; names = list(contenders)
        for r in range(args.rounds):
            for k in names[r % 3:] + names[:r % 3]:
                t0 = time.perf_counter(); contenders[k](); per[k].append((time.perf_counter() - t0) / args.calls * 1e3)
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(per[a], per[b]))
        res = dict(benchmark="bench_rollout", rounds=args.rounds, calls_per_round=args.calls,
                   median_ms_per_call={k: round(statistics.median(v), 4) for k, v in per.items()},
                   ratio_fixed_raw=round(ratio("ours (fixed version)", "raw httpx"), 3),
                   ratio_canary_raw=round(ratio("ours (alias, canary 50%)", "raw httpx"), 3), goal=1.15)
        # the caller's latency with and without shadowing, model answering in 20 ms
        control(url, delay_ms=20)
        def lat(n=300):
            out = []
            for i in range(n):
                t0 = time.perf_counter(); live.run(text, route_key=f"p{i}"); out.append((time.perf_counter() - t0) * 1e3)
            return out
        rollout.abort("sentiment", settings=s, user="bench"); live.live.refresh()
        base = lat()
        rollout.start("sentiment", 2, percent=0, shadow=100, settings=s, user="bench"); live.live.refresh()
        shadowed = lat()
        live._shadows.join()
        res["shadow"] = dict(p50_ms_without=round(percentile(base, 50), 2), p95_ms_without=round(percentile(base, 95), 2),
                             p50_ms_with=round(percentile(shadowed, 50), 2), p95_ms_with=round(percentile(shadowed, 95), 2),
                             shadow_jobs=live.shadow_stats())
        if not args.no_local:
            # the embedded model shares the caller's CPU: shadow work only through a one-job queue, dropped when busy
            ls = settings_for(tmp, url, **{"promptsys.prompts_dir": str(tmp / "prompts"), "promptsys.records": "none",
                                           "model.provider": "local", "local.decoding": "grammar"})
            rollout.abort("sentiment", settings=s, user="bench")
            local = Pipeline("sentiment", "production", settings=ls)
            reviews = [json.loads(l)["text"] for l in open(tmp / "prompts" / "sentiment" / "data" / "sentiment.jsonl")]
            def llat(n=72, gap=0.0):
                out = []
                for i in range(n):
                    t0 = time.perf_counter(); local.run(reviews[i % len(reviews)], cache=False)
                    out.append((time.perf_counter() - t0) * 1e3); time.sleep(gap)
                return out
            llat(10)
            lbase = llat()
            rollout.start("sentiment", 2, percent=0, shadow=100, settings=s, user="bench"); local.live.refresh()
            lbusy = llat()                    # back-to-back callers: the queue finds a caller in flight and drops
            lidle = llat(gap=0.1)             # callers with pauses: shadow work runs in the gaps
            local._shadows.join()
            res["shadow_local"] = dict(p50_ms_without=round(percentile(lbase, 50), 2),
                                       p95_ms_without=round(percentile(lbase, 95), 2),
                                       p95_ms_with_back_to_back=round(percentile(lbusy, 95), 2),
                                       p95_ms_with_gaps=round(percentile(lidle, 95), 2),
                                       shadow_jobs=local.shadow_stats())
        res["pass"] = res["ratio_fixed_raw"] <= 1.15 and res["ratio_canary_raw"] <= 1.15
        print(json.dumps(res, indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        raw.close()
    finally:
        registry.stop_live(); stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
