"""Eval overhead: wall time of `promptsys.evaluation.evaluate` over 3 versions of the sentiment task on the embedded model,
against the model's own time (the sum of the provider's `complete` calls, timed around the calls themselves).

Target (issue 3): wall / model time <= 1.10 — MLflow (import, a brand-new sqlite store, experiment, registry, runs,
tables, figures) is batched on a background thread, off the per-example path. Every store is fresh (temp dir): no
cache hits, the MLflow database is created during the run.

    python benchmarks/bench_eval.py [--limit 72] [--versions 1,2,3] [--decoding logprob|calibrated|grammar]

Also reports eval throughput on the embedded model: examples per second per version (its examples over the
model time of its calls) and overall (every example over the wall time).

Prints a small table and writes benchmarks/results/bench_eval.json.
"""
from __future__ import annotations
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=72, help="examples per version")
    ap.add_argument("--versions", default="1,2,3")
    ap.add_argument("--decoding", help="[local] decoding for this run (default: settings.ini's)")
    a = ap.parse_args(argv)
    versions = [int(v) for v in a.versions.split(",")]

    from promptsys.config import load_settings
    from promptsys.local import LocalProvider, load_model

    class TimedLocal(LocalProvider):
        "The embedded model, timing its own calls."
        total, calls = 0.0, 0
        def complete(self, req):
            t0 = time.perf_counter()
            try: return super().complete(req)
            finally:
                TimedLocal.total += time.perf_counter() - t0; TimedLocal.calls += 1

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        s = load_settings(ROOT / "settings.ini", env={}, overrides={
            "promptsys.state_dir": str(tmp / "state"), "cache.dir": str(tmp / "cache"), "promptsys.records": "none",
            "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db", "monitor.enabled": "false", "model.provider": "local",
            **({"local.decoding": a.decoding} if a.decoding else {})})
        L = s.local
        prov = TimedLocal(L.model_path, L.n_ctx, L.n_threads, L.n_batch, L.decoding)
        load_model(prov.path, L.n_ctx, L.n_threads, L.n_batch)        # model load is not eval overhead
        from promptsys import evaluation as pe, registry                   # cheap: MLflow is imported inside
        t0 = time.perf_counter()
        df, evals = pe.evaluate("sentiment", versions, settings=s, limit=a.limit, provider=prov, progress=False,
                                details=True)
        wall = time.perf_counter() - t0
        per_version = {f"v{n}": round(len(e.rows) / (sum(r["latency_ms"] for r in e.rows) / 1e3), 3)
                       for n, e in evals.items()}
        model_s, calls = TimedLocal.total, TimedLocal.calls
        client = registry.mlflow_client(s)
        exp = client.get_experiment_by_name(registry.experiment_name("sentiment", s))
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == len(versions) and all(r.info.status == "FINISHED" for r in runs), "MLflow runs missing"

    ratio = wall / model_s
    res = dict(benchmark="bench_eval", versions=versions, examples_per_version=a.limit, model_calls=calls,
               wall_s=round(wall, 3), model_s=round(model_s, 3), ratio=round(ratio, 4), target=1.10,
               passed=ratio <= 1.10, overhead_s=round(wall - model_s, 3),
               overhead_ms_per_call=round((wall - model_s) / max(1, calls) * 1e3, 3),
               accuracy={int(k): round(float(v), 4) for k, v in df.accuracy.items()}, decoding=L.decoding,
               examples_per_s=dict(overall=round(len(versions) * a.limit / wall, 3), **per_version),
               mlflow_runs=len(runs), fresh_mlflow_store=True,
               machine=dict(python=platform.python_version(), cpus=os.cpu_count(),
                            loadavg_1m=round(os.getloadavg()[0], 2)),
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(f"{'versions':<24}{','.join(map(str, versions))} × {a.limit} examples ({calls} model calls)")
    print(f"{'eval wall time':<24}{wall:8.2f} s   (MLflow logging included, fresh sqlite store)")
    print(f"{'model time (sum)':<24}{model_s:8.2f} s")
    print(f"{'overhead':<24}{wall - model_s:8.2f} s   ({res['overhead_ms_per_call']:.1f} ms a call)")
    print(f"{'ratio wall / model':<24}{ratio:8.3f}     target ≤ 1.10  {'PASS' if ratio <= 1.10 else 'FAIL'}")
    print(f"{'examples / s':<24}{res['examples_per_s']['overall']:8.2f}     overall ({L.decoding}); per version: "
          + ", ".join(f"{n} {x:.2f}" for n, x in per_version.items()))
    out = ROOT / "benchmarks" / "results" / "bench_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
