"""Issue 10 benchmark — the portable llama-cpp-python build against a native one, side by side on this machine.

    promptsys install-local                   # the portable build (installed)
    python benchmarks/bench_localbuild.py     # builds the native wheel once (cached), then measures both

The native wheel (`promptsys.localbuild.build_wheel(native=True)`) is unpacked into a private folder and put
first on PYTHONPATH of a child process, so both builds run the same code on the same model in one run.
Each child measures, with greedy decoding on SmolLM2-135M:
1. P6: the local provider (grammar decoding) against a direct `llama_cpp` call, same prompt and grammar;
2. the log-prob provider call;
3. eval throughput: the sentiment dataset (72 reviews) through `Pipeline.run_batch` with the cache off.
Rounds alternate portable / native so machine noise hits both alike; medians are reported.
"""
import json, os, statistics as st, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks/results/bench_localbuild.json"

WORKER = r'''
import json, sys, time
from pathlib import Path
import llama_cpp
root, n = Path(sys.argv[1]), int(sys.argv[2])
sys.path.insert(0, str(root / "benchmarks"))
from bench_foundation import bench_local          # P6: the same measurement as the foundation benchmark
from promptsys.prompts import load_task
from promptsys.pipeline import Pipeline
(_, grammar, direct, _), (_, logprob, _, _) = bench_local(n)
task = load_task("sentiment", root / "prompts")
rows = [json.loads(l) for l in (root / "prompts/sentiment/data/sentiment.jsonl").read_text().splitlines() if l.strip()]
p = Pipeline(task, 4, cache=False)
t = time.perf_counter(); rs = p.run_batch([r["text"] for r in rows], concurrency=1, progress=False)
wall = time.perf_counter() - t
print(json.dumps(dict(llama_cpp=llama_cpp.__file__, version=llama_cpp.__version__,
                      system_info=llama_cpp.llama_print_system_info().decode().strip(),
                      grammar_ms=grammar * 1e3, direct_ms=direct * 1e3, logprob_ms=logprob * 1e3,
                      eval_examples=len(rows), eval_s=wall, eval_per_s=len(rows) / wall,
                      eval_accuracy=sum(r.label == row["label"] for r, row in zip(rs, rows)) / len(rows))))
'''


def native_site() -> tuple[Path, float | None]:
    "Unpack the native wheel (building it once if missing) into a folder for PYTHONPATH; (folder, build seconds)."
    from promptsys.localbuild import build_variant, find_wheel, build_wheel
    label, _ = build_variant(True)
    wheel, secs = find_wheel(label), None
    if wheel is None:
        t = time.perf_counter(); wheel = build_wheel(native=True); secs = time.perf_counter() - t
    site = Path(tempfile.gettempdir()) / f"promptsys-bench-{label}"
    if not (site / "llama_cpp").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       check=True)
    return site, secs


def run(site: Path | None, n: int, state: Path) -> dict:
    env = dict(os.environ, PROMPTSYS_PROMPTSYS__STATE_DIR=str(state))
    if site: env["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"
    out = subprocess.run([sys.executable, "-c", WORKER, str(ROOT), str(n)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=1800)
    if out.returncode: raise SystemExit(f"worker failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(rounds: int = 4, n: int = 30):
    from promptsys.localbuild import installed_build
    site, native_build_s = native_site()
    port, nat = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(rounds):
            for which, out in (("portable", port), ("native", nat)) if i % 2 == 0 else (("native", nat), ("portable", port)):
                r = run(site if which == "native" else None, n, Path(d) / which)
                print(f"round {i + 1} {which:8} grammar {r['grammar_ms']:.1f} ms  direct {r['direct_ms']:.1f} ms  "
                      f"logprob {r['logprob_ms']:.1f} ms  eval {r['eval_per_s']:.2f} ex/s", flush=True)
                out.append(r)
    med = lambda rs, k: st.median(r[k] for r in rs)
    res = dict(installed=installed_build(), native_build_s=native_build_s,
               portable={k: med(port, k) for k in ("grammar_ms", "direct_ms", "logprob_ms", "eval_per_s", "eval_accuracy")},
               native={k: med(nat, k) for k in ("grammar_ms", "direct_ms", "logprob_ms", "eval_per_s", "eval_accuracy")},
               system_info=dict(portable=port[0]["system_info"], native=nat[0]["system_info"]),
               paths=dict(portable=port[0]["llama_cpp"], native=nat[0]["llama_cpp"]), rounds=rounds, calls=n)
    print(f"\n{'':34}{'portable':>10}{'native':>10}{'portable/native':>17}")
    for k, name in (("grammar_ms", "local provider call (P6), ms"), ("direct_ms", "direct llama_cpp call, ms"),
                    ("logprob_ms", "log-prob provider call, ms"), ("eval_per_s", "eval throughput, examples/s")):
        p, q = res["portable"][k], res["native"][k]
        print(f"{name:34}{p:10.2f}{q:10.2f}{p / q:17.2f}")
    print(f"\nP6 ratio (provider / direct): portable {res['portable']['grammar_ms'] / res['portable']['direct_ms']:.3f}, "
          f"native {res['native']['grammar_ms'] / res['native']['direct_ms']:.3f}")
    print("system info:\n  portable:", res["system_info"]["portable"], "\n  native:  ", res["system_info"]["native"])
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
