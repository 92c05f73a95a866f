"""A cache hit through Redis vs a raw redis-py GET of the same value, side by side against one local redis-server.

    python benchmarks/bench_redis.py [--rounds 21] [--calls 500]

Starts its own `redis-server` on a free loopback port (no persistence) and stops it after.
Contenders, alternating within each round (rotating order) so machine load hits them alike:
- raw GET: `redis.Redis.get(key)` of the stored entry (bytes, no decoding), same client settings as ours;
- RedisCache.get: `promptsys.shared.RedisCache.get(key)` — the outage check, GET, JSON decode, hit count;
- pipeline hit (redis): `Pipeline.run(text)` answered from the Redis cache (input validation, prompt render,
  key hash, GET, Result, no records);
- pipeline hit (disk): the same with the embedded diskcache, for comparison.
The table gives the median over rounds of the per-call mean; ratios are medians of per-round ratios.
Goal (issue 5): RedisCache.get / raw GET <= 2.
"""
from __future__ import annotations
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fakeserver import start_server, stop_server  # noqa: E402

URL_ENV = "PROMPTSYS_BENCH_REDIS_URL"


def settings_for(tmp:Path, url:str, redis:bool):
    "Settings on the fake server, cache on, records off; with `redis`, [redis] use = cache (added if the schema lacks it)."
    from promptsys.config import SCHEMA, Section, Settings, load_settings
    ov = {"promptsys.state_dir": str(tmp / "state"), "cache.dir": str(tmp / "cache"), "cache.enabled": "true",
          "promptsys.records": "none", "monitor.enabled": "false", "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db",
          "monitor.db_path": str(tmp / "metrics.db"), "model.provider": "openai", "openai.base_url": url + "/v1",
          "openai.model": "gpt-4o-mini", "openai.api_key_env": "", "promptsys.mode": "strict"}
    red = {"use": "cache" if redis else "", "url_env": URL_ENV, "key_prefix": "bench", "retry_seconds": "5", "timeout": "0.25"}
    if "redis" in SCHEMA:
        return load_settings(ROOT / "settings.ini", env={}, overrides={**ov, **{f"redis.{k}": v for k, v in red.items() if k in SCHEMA["redis"]}})
    s = load_settings(ROOT / "settings.ini", overrides=ov, env={})
    secs = {k: Section(v) for k, v in s.as_dict().items()}
    secs["redis"] = Section(red, use=("cache",) if redis else ())
    return Settings(secs, s.path, s.base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--calls", type=int, default=500, help="calls per contender per round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_redis.json"))
    args = ap.parse_args(argv)
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (apt-get install redis-server): skipped")
        out.write_text(json.dumps({"benchmark": "bench_redis", "skipped": "redis-server not installed"}, indent=1) + "\n")
        return 0
    import redis
    from promptsys import shared
    from promptsys.pipeline import Pipeline
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0)); port = so.getsockname()[1]
    srv = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc, url = start_server()
    tmp = Path(tempfile.mkdtemp(prefix="bench_redis_"))
    try:
        for _ in range(200):
            try: socket.create_connection(("127.0.0.1", port), 0.1).close(); break
            except OSError: time.sleep(0.05)
        os.environ[URL_ENV] = f"redis://127.0.0.1:{port}/0"
        text = "I love this kettle, it boils fast and looks great."
        pr = shared.attach(Pipeline("sentiment", 1, settings=settings_for(tmp, url, True)))
        pd = Pipeline("sentiment", 1, settings=settings_for(tmp, url, False))
        assert isinstance(pr.cache, shared.RedisCache)
        first = pr.run(text); pd.run(text)
        assert not first.cache_hit and pr.run(text).cache_hit and pd.run(text).cache_hit
        key = pr._key(pr.prompt.render(text=text))
        rc: shared.RedisCache = pr.cache
        raw = redis.Redis.from_url(os.environ[URL_ENV], socket_timeout=0.25, socket_connect_timeout=0.25)
        rkey = rc.prefix + key
        value = raw.get(rkey)
        assert value is not None and rc.get(key) == json.loads(value)

        contenders = {"raw GET": lambda: raw.get(rkey), "RedisCache.get": lambda: rc.get(key),
                      "pipeline hit (redis)": lambda: pr.run(text), "pipeline hit (disk)": lambda: pd.run(text)}
        for fn in contenders.values():
            for _ in range(200): fn()
        per_round = {k: [] for k in contenders}
        names = list(contenders)
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                fn = contenders[k]
                t0 = time.perf_counter()
                for _ in range(args.calls): fn()
                per_round[k].append((time.perf_counter() - t0) / args.calls * 1e6)
        med = {k: statistics.median(v) for k, v in per_round.items()}
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))
        res = {"benchmark": "bench_redis", "rounds": args.rounds, "calls_per_round": args.calls, "value_bytes": len(value),
               "redis_server": raw.info("server").get("redis_version"), "redis_py": redis.__version__,
               "median_us_per_call": {k: round(v, 2) for k, v in med.items()},
               "ratio_cache_get_raw": round(ratio("RedisCache.get", "raw GET"), 3),
               "ratio_pipeline_hit_raw": round(ratio("pipeline hit (redis)", "raw GET"), 3),
               "ratio_pipeline_redis_disk": round(ratio("pipeline hit (redis)", "pipeline hit (disk)"), 3),
               "goal_cache_get_raw": 2.0}
        res["pass"] = res["ratio_cache_get_raw"] <= 2.0
        print(f"{'contender':<22}{'median us/call':>16}{'x raw GET':>11}")
        for k in names:
            print(f"{k:<22}{med[k]:>16.1f}{ratio(k, 'raw GET') if k != 'raw GET' else 1.0:>11.2f}")
        print(f"RedisCache.get / raw GET = {res['ratio_cache_get_raw']:.3f} (goal <= 2) -> {'PASS' if res['pass'] else 'MISS'}; "
              f"pipeline hit via Redis / raw GET = {res['ratio_pipeline_hit_raw']:.2f}")
        out.write_text(json.dumps(res, indent=1) + "\n")
        raw.close()
    finally:
        stop_server(proc)
        srv.terminate(); srv.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
