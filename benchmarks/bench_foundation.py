"""Issue 1 benchmarks — side-by-side ratios in one run (ours / the raw library call), medians.

    python benchmarks/bench_foundation.py

1. import cost: `import promptsys` (and `from promptsys import Pipeline`) vs `import httpx`, each in fresh processes
2. local provider call vs a direct llama_cpp call on the same prompt, same grammar, same settings
3. cache-hit pipeline call vs a raw `diskcache.Cache.get` of the same entry
"""
import json, statistics as st, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks/results/bench_foundation.json"


def import_time(stmt: str, n: int = 15) -> float:
    code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
    runs = []
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
        runs.append(float(out.stdout))
    return st.median(runs)


def bench_imports():
    # Interleave the three so machine noise hits them alike.
    res = {"httpx": [], "promptsys": [], "Pipeline": []}
    for _ in range(5):
        res["httpx"].append(import_time("import httpx", 3))
        res["promptsys"].append(import_time("import promptsys", 3))
        res["Pipeline"].append(import_time("from promptsys import Pipeline", 3))
    m = {k: st.median(v) for k, v in res.items()}
    return [("import promptsys / import httpx", m["promptsys"], m["httpx"], 1.8),
            ("from promptsys import Pipeline / import httpx", m["Pipeline"], m["httpx"], 1.8)]


def bench_local(n: int = 40):
    from promptsys.local import LocalProvider
    from promptsys.providers import Request
    from promptsys.prompts import load_task
    task = load_task("sentiment", ROOT / "prompts")
    prov = LocalProvider(decoding="grammar")
    msgs = [{"role": "user", "content": task.version(4).render(text="The zipper broke on day two. Refund, please.")}]
    req = Request(msgs, max_tokens=8, schema=task.output)
    llm, grammar = prov.llm, prov.grammar(task.output)
    direct = lambda: llm.create_chat_completion(msgs, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                                repeat_penalty=1.0, seed=0, max_tokens=8, grammar=grammar)
    ours = lambda: prov.complete(req)
    a, b = [], []
    for f in (direct, ours): f()                                  # warm up
    for i in range(n):                                            # alternate who goes first (no order bias)
        for f, out in ((direct, a), (ours, b)) if i % 2 == 0 else ((ours, b), (direct, a)):
            t = time.perf_counter(); f(); out.append(time.perf_counter() - t)
    lp = LocalProvider(decoding="logprob"); lp.complete(req)
    c = []
    for _ in range(n):
        t = time.perf_counter(); lp.complete(req); c.append(time.perf_counter() - t)
    return [("local provider (grammar) / direct llama_cpp call", st.median(b), st.median(a), 1.02),
            ("local provider (logprob) / direct llama_cpp call (info)", st.median(c), st.median(a), None)]


def bench_cache_hit(n: int = 5000):
    from promptsys.config import load_settings
    from promptsys.pipeline import Pipeline
    tmp = Path(tempfile.mkdtemp())
    s = load_settings(ROOT / "settings.ini", env={}, overrides={"promptsys.state_dir": str(tmp), "promptsys.records": "none"})
    p = Pipeline("sentiment", 4, settings=s)
    text = "The zipper broke on day two. Refund, please."
    assert not p.run(text).cache_hit and p.run(text).cache_hit
    raw, key = p.cache._c, next(iter(p.cache._c.iterkeys()))
    a, b = [], []
    for _ in range(n):
        t = time.perf_counter(); raw.get(key); a.append(time.perf_counter() - t)
        t = time.perf_counter(); p.run(text); b.append(time.perf_counter() - t)
    return [("cache-hit pipeline call / raw diskcache.Cache.get", st.median(b), st.median(a), 3.0)]


def main():
    rows = bench_imports() + bench_local() + bench_cache_hit()
    out = []
    print(f"{'benchmark':58} {'ours':>10} {'raw':>10} {'ratio':>7} {'goal':>6}")
    for name, ours, raw, goal in rows:
        ratio = ours / raw
        ok = "" if goal is None else ("ok" if ratio <= goal else "MISS")
        print(f"{name:58} {ours*1e3:9.3f}ms {raw*1e3:9.3f}ms {ratio:7.2f} {('≤'+str(goal)) if goal else '':>6} {ok}")
        out.append(dict(name=name, ours_ms=ours * 1e3, raw_ms=raw * 1e3, ratio=ratio, goal=goal))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
