"""Async batch throughput: `Pipeline.arun_batch` of 2,000 inputs at concurrency 32 against a server that
answers after 100 ms, vs the ideal 32 / 0.1 s = 320 calls/s (goal: >= 0.9 x ideal).

    python benchmarks/bench_batch.py [--n 2000] [--concurrency 32] [--delay-ms 100] [--repeats 3]

The same pipeline also runs on httpx's own `httpx.AsyncClient` ("ours on httpx"), the alternative to the
`httpx-aiohttp` client promptsys uses. The same batch is also sent raw, under an `asyncio.Semaphore`, with
`httpx.AsyncClient` and with `aiohttp` when it is importable (what the server and the loopback
allow with a lean client); the contenders alternate, medians over the repeats. The CPU column is this
process's CPU time per call (the server runs in its own process): on a 2-core machine shared with other
work, client CPU per call is what caps throughput. The pipeline runs with the retry, breaker and cost
layers on, the cache off, no faults, records to the log (off at WARNING).
"""
from __future__ import annotations
import argparse, asyncio, json, resource, statistics, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fakeserver import start_server, stop_server, stats  # noqa: E402


async def _client_of(p):
    "The class of the async client `p`'s provider uses."
    return await p.provider.aclient()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--delay-ms", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_batch.json"))
    args = ap.parse_args(argv)
    import httpx
    from promptsys.config import load_settings
    from promptsys.pipeline import Pipeline
    from promptsys.providers import Request
    tmp = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    proc, url = start_server("--delay-ms", str(args.delay_ms))
    try:
        s = load_settings(ROOT / "settings.ini", env={}, overrides={
            "promptsys.state_dir": str(tmp / "state"), "cache.dir": str(tmp / "cache"), "cache.enabled": "false",
            "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db", "monitor.db_path": str(tmp / "metrics.db"),
            "model.provider": "openai", "openai.base_url": url + "/v1", "openai.model": "gpt-4o-mini",
            "openai.api_key_env": ""})
        p = Pipeline("sentiment", 1, settings=s)
        texts = ["I love this kettle", "terrible, it broke", "arrived on Tuesday", "great value"]
        inputs = [f"{texts[i % 4]} #{i}" for i in range(args.n)]
        body = p.provider.body(Request([{"role": "user", "content": p.prompt.render(text=inputs[0])}], "", p.max_tokens, p.temperature, p.seed, p.task.output))
        ideal = args.concurrency / (args.delay_ms / 1000.0)

        def cpu():
            r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime

        async def ours():
            t0 = time.perf_counter()
            res = await p.arun_batch(inputs, concurrency=args.concurrency, progress=False, cache=False)
            dt = time.perf_counter() - t0
            assert all(r.ok for r in res), [r for r in res if not r.ok][:3]
            return dt

        async def raw_aiohttp():
            import aiohttp
            sem = asyncio.Semaphore(args.concurrency)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as c:
                async def one(x):
                    async with sem:
                        b = json.dumps(dict(body, messages=[{"role": "user", "content": x}])).encode()
                        async with c.post(url + "/v1/chat/completions", data=b,
                                          headers={"content-type": "application/json"}) as r:
                            r.raise_for_status()
                            return json.loads(await r.read())["choices"][0]["message"]["content"]
                t0 = time.perf_counter()
                await asyncio.gather(*(one(x) for x in inputs))
                return time.perf_counter() - t0

        async def raw():
            sem = asyncio.Semaphore(args.concurrency)
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=100, max_keepalive_connections=100)) as c:
                async def one(x):
                    async with sem:
                        b = dict(body, messages=[{"role": "user", "content": x}])
                        r = await c.post(url + "/v1/chat/completions", json=b); r.raise_for_status()
                        return r.json()["choices"][0]["message"]["content"]
                t0 = time.perf_counter()
                await asyncio.gather(*(one(x) for x in inputs))
                return time.perf_counter() - t0

        import promptsys.providers as providers
        p_httpx = Pipeline("sentiment", 1, settings=s)     # the same pipeline on httpx's own AsyncClient

        async def ours_httpx():
            made, providers.async_client = providers.async_client, lambda **kw: httpx.AsyncClient(**kw)
            try: await p_httpx.provider.aclient()            # made once per event loop, here with httpx's client
            finally: providers.async_client = made
            t0 = time.perf_counter()
            res = await p_httpx.arun_batch(inputs, concurrency=args.concurrency, progress=False, cache=False)
            dt = time.perf_counter() - t0
            assert all(r.ok for r in res), [r for r in res if not r.ok][:3]
            return dt

        runners = {"ours": ours, "ours on httpx": ours_httpx, "raw httpx": raw}
        try:
            import aiohttp  # noqa: F401
            runners["raw aiohttp"] = raw_aiohttp
        except ImportError: pass
        cpu_ms = {k: [] for k in runners}

        async def bench():
            await p.arun_batch(inputs[:64], concurrency=args.concurrency, progress=False, cache=False)  # warm-up
            times = {k: [] for k in runners}
            names = list(runners)
            for i in range(args.repeats):
                for k in names[i % len(names):] + names[:i % len(names)]:
                    c0 = cpu()
                    times[k].append(await runners[k]())
                    cpu_ms[k].append((cpu() - c0) / args.n * 1e3)
            return times

        times = asyncio.run(bench())
        thr = {k: args.n / statistics.median(v) for k, v in times.items()}
        res = {"benchmark": "bench_batch", "n": args.n, "concurrency": args.concurrency, "delay_ms": args.delay_ms,
               "repeats": args.repeats, "ideal_calls_per_s": ideal,
               "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
               "calls_per_s": {k: round(v, 1) for k, v in thr.items()},
               "ratio_ours_ideal": round(thr["ours"] / ideal, 3),
               "ratio_raw_ideal": round(thr["raw httpx"] / ideal, 3),
               "ratio_ours_on_httpx_ideal": round(thr["ours on httpx"] / ideal, 3),
               "async_client": type(asyncio.run(_client_of(p))).__name__,
               "ratio_ours_raw": round(thr["ours"] / thr["raw httpx"], 3), "goal_ours_ideal": 0.9,
               "client_cpu_ms_per_call": {k: round(statistics.median(v), 3) for k, v in cpu_ms.items()},
               "server_requests": stats(url)["total"]}
        res["pass"] = res["ratio_ours_ideal"] >= 0.9
        print(f"{'contender':<15}{'median s':>10}{'calls/s':>10}{'x ideal':>9}{'cpu ms/call':>13}")
        for k, v in times.items():
            print(f"{k:<15}{statistics.median(v):>10.2f}{thr[k]:>10.1f}{thr[k] / ideal:>9.3f}"
                  f"{statistics.median(cpu_ms[k]):>13.2f}")
        print(f"ideal {ideal:.0f} calls/s; ours / ideal = {res['ratio_ours_ideal']:.3f} (goal >= 0.9) -> "
              f"{'PASS' if res['pass'] else 'MISS'}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
