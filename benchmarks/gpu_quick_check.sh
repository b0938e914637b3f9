#!/usr/bin/env bash
# Quick GPU check (~2 min) on a machine with one NVIDIA GPU, from anywhere in the checkout:
#   bash benchmarks/gpu_quick_check.sh          # JSON to $OUT (if set) or benchmarks/results/tmp
# (a) CUDA float32 accuracy at 765 genes (batch 4, 5 heads) of the triton, tree (the
#     pure-PyTorch tree code), exact, reference and (last) compiled backends: max and RMS
#     error of out, dq, dk, dv against the float64 CUDA reference, and as ratios to the
#     float32 reference's own error (tests/_oracle.py); before the compiled backend, the tree
#     code's CPU/CUDA parity at 1708 genes in float32 and float64, nearly uniform (scale 0.5)
#     and sharp (scale 3, through the tree): the largest difference of out, dq, dk, dv between
#     the two devices relative to the larger of the CPU result's largest entry and the scale
#     of its terms (the tolerance's metric), ok within twice the dtype's default tolerance
#     plus 4 ulps;
# (b) one training step (3 layers, 5 heads, Adam) at 1708 genes, batch 16: triton, exact,
#     compiled, tree (median of 5 after 2 warm-ups, which include compilation).
# Each part runs in its own process under a timeout, each backend in its own try block, and
# the JSON is rewritten after every result, so one failure or a cut-off keeps the rest.
# Installs nothing but captum, and only from a local wheel in .whl/ when it is missing.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/tmp}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
if ! $PY -c "import captum" 2>/dev/null && ls .whl/captum-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tgem_site \
    .whl/captum-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/tgem_site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -2
script=$(mktemp /tmp/tgem_quick.XXXXXX.py)
cat >"$script" <<'PY'
import json, os, platform, sys, time, traceback
import torch

part, path = sys.argv[1], sys.argv[2]
dev = torch.device(os.environ.get("QUICK_DEVICE", "cuda"))  # QUICK_DEVICE=cpu: smoke test
result = {"part": part, "device": str(dev), "python": platform.python_version(),
          "torch": torch.__version__,
          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
          "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
try:
    import numpy, triton
    result.update(numpy=numpy.__version__, triton=triton.__version__)
except Exception as exc:
    result["import_error"] = repr(exc)


def save():
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)


def guarded(key, fn):
    t0 = time.perf_counter()
    try:
        result[key] = fn()
    except Exception as exc:
        result[key] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        traceback.print_exc(limit=3)
    brief = {k: v for k, v in result[key].items() if k not in ("out", "dq", "dk", "dv")} \
        if isinstance(result[key], dict) else result[key]
    print(f"{key} ({time.perf_counter() - t0:.1f} s): {json.dumps(brief)}", flush=True)
    save()


from tgem._kernels import backend_status, resolve_backend
result["auto"] = resolve_backend("auto", dev, torch.float32).name
result["status"] = backend_status(dev, torch.float32)
save()

if part == "accuracy":
    from tests._oracle import assert_float32_rule, attention_and_grads, float32_errors

    def inputs(scale, seed, g=765):
        gen = torch.Generator().manual_seed(seed)
        return [(torch.randn(4, 5, g, generator=gen, dtype=torch.float64) * s).to(dev)
                for s in (scale, scale, scale, 1.0)]  # q, k, v, upstream gradient

    def rms(a, b):
        return float(((a.double() - b) ** 2).mean().sqrt())

    def check(name, scale):
        q, k, v, g = inputs(scale, seed=765)
        fn = lambda q, k, v: resolve_backend(name, q.device, q.dtype).fn(q, k, v)  # noqa: E731
        maxima = float32_errors(fn, q, k, v, g)  # (path, float32 reference, scale) per tensor
        e64 = attention_and_grads(attention_ref, q, k, v, g)
        r32 = attention_and_grads(attention_ref, *(t.float() for t in (q, k, v, g)))
        p32 = attention_and_grads(fn, *(t.float() for t in (q, k, v, g)))
        rows = {}
        for what, (m, mref, _), e, r, p in zip(("out", "dq", "dk", "dv"), maxima, e64, r32,
                                               p32):
            rr, rp = rms(r, e), rms(p, e)
            rows[what] = {"max": m, "ref_max": mref, "max_ratio": m / mref if mref else None,
                          "rms": rp, "ref_rms": rr, "rms_ratio": rp / rr if rr else None,
                          "finite": bool(torch.isfinite(p).all())}
        tensors = list(rows.values())
        rows["worst_max_ratio"] = max(r["max_ratio"] or 0 for r in tensors)
        rows["worst_rms_ratio"] = max(r["rms_ratio"] or 0 for r in tensors)
        try:  # the tests' rule: max error <= 2 x the float32 reference's + 4 ulps of the scale
            assert_float32_rule(maxima)
            rows["rule_ok"] = True
        except AssertionError as exc:
            rows["rule_ok"] = str(exc)
        return rows

    from tgem._kernels import reference_attention as attention_ref
    def accuracy(names):
        for name in names:
            for scale in (0.5, 3.0):
                guarded(f"accuracy_765_{name}_scale{scale}", lambda n=name, s=scale: check(n, s))

    accuracy(("triton", "tree", "exact", "reference"))
    from tgem._kernels._tree import DEFAULT_TOL, tree_attention

    def parity(dtype, scale):  # the same tree code on the CPU and on the device
        q, k, v, g = (t.to(dtype) for t in inputs(scale, seed=1708, g=1708))
        here = attention_and_grads(tree_attention, q, k, v, g)
        cpu = attention_and_grads(tree_attention, *(t.cpu() for t in (q, k, v, g)))
        mq, mk, mv, mg = (float(t.abs().max()) for t in (q, k, v, g))
        bound = 2 * DEFAULT_TOL[dtype] + 4 * torch.finfo(dtype).eps
        rows = {"reach": float((q.abs().amax(-1) * (k.amax(-1) - k.amin(-1))).max())}
        for what, a, c, sc in zip(("out", "dq", "dk", "dv"), here, cpu,
                                  (mv, mg * mv * mk, mg * mv * mq, mg)):
            diff = float((a.cpu().double() - c.double()).abs().max())
            rel = diff / max(float(c.abs().max()), sc)
            rows[what] = {"max_diff": diff, "relative": rel, "ok": rel <= bound,
                          "finite": bool(torch.isfinite(a).all())}
        rows["parity_ok"] = all(rows[w]["ok"] and rows[w]["finite"]
                                for w in ("out", "dq", "dk", "dv"))
        return rows

    for dtype in (torch.float32, torch.float64):
        for scale in (0.5, 3.0):
            guarded(f"parity_1708_tree_cpu_vs_{dev.type}_{str(dtype)[6:]}_scale{scale}",
                    lambda d=dtype, s=scale: parity(d, s))
    accuracy(("compiled",))  # last: it compiles
else:
    from benchmarks import bench_gpu

    bench_gpu.DEVICE = dev.type
    for name in ("triton", "exact", "compiled", "tree"):  # tree last: its speed is unknown
        guarded(f"train_step_s_1708_batch16_{name}",
                lambda n=name: bench_gpu.train_step_s(1708, n, 16, reps=5, warmup=2))
PY
echo "== (a) accuracy at 765 genes"
timeout "${QUICK_TIMEOUT_A:-100}" $PY "$script" accuracy "$out/quick_accuracy.json" 2>&1
echo "== (b) training step at 1708 genes, batch 16"
timeout "${QUICK_TIMEOUT_B:-70}" $PY "$script" train "$out/quick_train.json" 2>&1
rm -f "$script"
echo "== JSON: $out/quick_accuracy.json $out/quick_train.json"
