"""GPU benchmark: the Triton attention kernels against the pure-PyTorch exact path.

Run on a machine with an NVIDIA GPU (it never asserts a time)::

    PYTHONPATH=. python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json

It measures, in this order, writing the JSON after every step (a cut-off run keeps what it
measured):

1. the GPU's achievable ``exp2`` rate (``ex2.approx`` on the special-function units) and
   float32 FMA rate, with two probe kernels;
2. a sweep of tile shapes for each attention kernel at 1708 genes, batch 64, 5 heads (the
   fastest is used below and recorded), and each kernel's time, exponentials per second and
   share of the roofline bound ``max(exps / exp2 rate, flops / FMA rate)``;
3. the float32 accuracy of the chosen kernels against float64 at 1708 genes;
4. for the ``triton`` and ``exact`` backends on the same GPU, with 3 layers and 5 heads at
   1708 and 22,283 genes: the training-step time (Adam, batch 64 and 16), inference
   samples/s (batch 64) and Integrated Gradients (50 steps, forward and backward, batched
   over samples) in seconds per sample. Medians of 5 repetitions after 2 warm-ups (IG: 3
   after 1); at the larger gene count, a measurement predicted (from the first gene count's
   time and the genes-squared work) to take over a second runs once without warm-up (the
   kernels are already compiled), and one predicted over ``--max-seconds`` is skipped and
   marked so in the JSON (never estimated).

Inputs are synthetic expression-like values (``|N(0, 1)| * 2``): the work does not depend on
the values. Counts per gene pair (what the kernels do, see ``tgem/_kernels/_triton.py``):
one exp2 and 19 / 7 / 10 float32 flops (an FMA is 2) in the training forward / inference
forward / backward kernels. Score: 2 FMAs (two-term scaled query), 4 flops. Forward: Z 1,
numerator 2, six centred query-gradient sums 12. Backward: dv 2; dk a product, a difference
and an FMA, 4. That is 10 / 4 / 6 float32 instructions besides the exp2.
"""

import argparse
import json
import logging
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("bench_gpu")

#: ``--smoke`` runs everything tiny on the CPU through Triton's interpreter (start Python
#: with TRITON_INTERPRET=1) to check this script without a GPU; its numbers mean nothing.
DEVICE = "cuda"
INTERPRET = False
BACKEND_NAMES = {}  # --smoke maps "triton" to an interpreter-backed backend
SMOKE_BATCH = {64: 2, 16: 1}  # --smoke's batch sizes instead of 64 and 16
IG_STEPS = 50

FLOPS_PER_PAIR = {"forward": 19, "forward_nograd": 7, "backward": 10}
CPU_NATIVE_TRAIN_SAMPLES_PER_S = 16 / 0.15  # attention.md: fused AVX-512, 2 cores, batch 16
SWEEP = [
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4},
    {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4},
]


# ------------------------------------------------------------------------------ probes
def _probe_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def exp2_probe(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offs)
        b = a * 0.5
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(ITERS):  # two independent chains, one FADD per exp2
            if FAST:
                ea = tl.inline_asm_elementwise(
                    "ex2.approx.ftz.f32 $0, $1;",
                    "=f,f",
                    [a],
                    dtype=tl.float32,
                    is_pure=True,
                    pack=1,
                )
                eb = tl.inline_asm_elementwise(
                    "ex2.approx.ftz.f32 $0, $1;",
                    "=f,f",
                    [b],
                    dtype=tl.float32,
                    is_pure=True,
                    pack=1,
                )
            else:
                ea = tl.exp2(a)
                eb = tl.exp2(b)
            a = ea - 1.25
            b = eb - 1.25
        acc += a + b
        tl.store(out_ptr + offs, acc)

    @triton.jit
    def fma_probe(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offs)
        b = a + 1.0
        c = a - 1.0
        d = a * 0.5
        for _ in range(ITERS):  # four independent FMA chains
            a = a * 0.999 + 0.001
            b = b * 0.999 + 0.001
            c = c * 0.999 + 0.001
            d = d * 0.999 + 0.001
        tl.store(out_ptr + offs, a + b + c + d)

    return exp2_probe, fma_probe


def probe_rates() -> dict:
    exp2_probe, fma_probe = _probe_kernels()
    if DEVICE == "cuda":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        block, iters = 1024, 2048
    else:
        sms, block, iters = 1, 16, 4
    n = sms * 32 * block
    x = torch.rand(n, device=DEVICE) - 0.5
    out = torch.empty_like(x)
    grid = (n // block,)
    res = {}
    for fast in (False, True) if not INTERPRET else (False,):
        try:
            ms = _bench_ms(
                lambda f=fast: exp2_probe[grid](
                    x, out, ITERS=iters, BLOCK=block, FAST=f, num_warps=4
                ),
                50,
                300,
            )
            res[f"exp2_per_s{'_ftz_asm' if fast else ''}"] = 2 * n * iters / (ms * 1e-3)
        except Exception as exc:  # inline PTX unsupported: record and go on
            res[f"exp2_error{'_ftz_asm' if fast else ''}"] = repr(exc)[:300]
    ms = _bench_ms(lambda: fma_probe[grid](x, out, ITERS=iters, BLOCK=block, num_warps=4), 50, 300)
    res["fp32_flops_per_s"] = 4 * 2 * n * iters / (ms * 1e-3)
    res["exp2_peak_per_s"] = max(v for k, v in res.items() if k.startswith("exp2_per_s"))
    return res


# ------------------------------------------------------------------------- kernels
def _kernel_inputs(rows, genes, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.rand(rows // 5, genes, generator=gen, device=DEVICE) * 2
    w = torch.randn(3, 5, genes, generator=gen, device=DEVICE) * math.sqrt(2 / (genes + 5))
    q, k, v = (x[:, None, :] * w[i] for i in range(3))
    return [t.reshape(rows, genes).contiguous() for t in (q, k, v)]


def time_kernels(rows: int, genes: int) -> dict:
    """Median time of each kernel with the current ``CONFIG``, and its rates."""
    from tgem._kernels import _triton as ta

    q, k, v = _kernel_inputs(rows, genes)
    grad = torch.randn_like(q)
    out, inv_z, t, scaled = ta._launch_forward(q, k, v, True, INTERPRET)
    calls = {
        "forward": lambda: ta._launch_forward(q, k, v, True, INTERPRET),
        "forward_nograd": lambda: ta._launch_forward(q, k, v, False, INTERPRET),
        "backward": lambda: ta._launch_backward(q, k, v, scaled, out, inv_z, t, grad, INTERPRET),
    }
    res = {}
    for name, fn in calls.items():
        ms = _bench_ms(fn)
        pairs = rows * genes * genes
        res[name] = {
            "ms": ms,
            "exp2_per_s": pairs / (ms * 1e-3),
            "flops_per_s": FLOPS_PER_PAIR[name] * pairs / (ms * 1e-3),
        }
    return res


def sweep(rows: int, genes: int) -> dict:
    """Time every ``SWEEP`` tile shape for each kernel; keep the fastest in ``CONFIG``."""
    from tgem._kernels import _triton as ta

    results = {name: [] for name in ta.CONFIG}
    best = {}
    for cfg in SWEEP if not INTERPRET else ():
        full = dict(cfg)
        for name in ta.CONFIG:
            ta.CONFIG[name] = full
        try:
            timed = time_kernels(rows, genes)
        except Exception as exc:
            logger.warning("config %s failed: %r", full, exc)
            for name in results:
                results[name].append({"config": full, "error": repr(exc)[:300]})
            continue
        for name, r in timed.items():
            results[name].append({"config": full, "ms": r["ms"]})
            if name not in best or r["ms"] < best[name][1]:
                best[name] = (full, r["ms"])
    for name, (cfg, _) in best.items():
        ta.CONFIG[name] = cfg
    return {"results": results, "chosen": {n: c for n, (c, _) in best.items()}}


def kernel_info(genes=1708, rows=320) -> dict:
    """Registers, spills and the exp2 instruction of each kernel as compiled with CONFIG."""
    import re

    import triton

    from tgem._kernels import _triton as ta

    q, k, v = _kernel_inputs(rows, genes)
    out, inv_z, t, (hi, lo, m2) = ta._launch_forward(q, k, v, True, False)
    cand = torch.cat(ta._shift_candidates(q, k, v), dim=-1).contiguous()
    bufs = [torch.empty_like(q) for _ in range(6)]
    info = {}
    for name, need in (("forward", True), ("forward_nograd", False), ("backward", None)):
        cfg, launch = ta._config(name, False)
        grid = (rows, triton.cdiv(genes, cfg["BLOCK_M"]))
        if need is None:
            ck = ta._kernel("backward", False)[grid](
                hi, lo, q, k, v, m2, out, inv_z, t, q, *bufs[3:], genes, **cfg, **launch
            )
        else:
            ck = ta._kernel("forward", False)[grid](
                hi, lo, k, v, m2, cand, *bufs[:3], genes, NEED_GRAD=need, **cfg, **launch
            )
        ptx = ck.asm.get("ptx", "")
        info[name] = {
            "n_regs": getattr(ck, "n_regs", None),
            "n_spills": getattr(ck, "n_spills", None),
            "ex2_in_ptx": sorted(set(re.findall(r"ex2\.approx[.a-z0-9]*", ptx))),
        }
    return info


def kernel_accuracy(genes=1708) -> dict:
    from tgem._kernels import exact_attention, reference_attention
    from tgem._kernels._triton import triton_attention

    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q, k, v = (torch.randn(2, 2, genes, generator=gen, device=DEVICE) for _ in range(3))
    g = torch.randn(2, 2, genes, generator=gen, device=DEVICE)
    res = {}
    outs = {}
    for name, fn, dt in (
        ("float64", reference_attention, torch.float64),
        ("reference32", reference_attention, torch.float32),
        ("exact32", exact_attention, torch.float32),
        ("triton32", triton_attention, torch.float32),
    ):
        xs = [x.to(dt).requires_grad_() for x in (q, k, v)]
        o = fn(*xs)
        outs[name] = [o.detach(), *torch.autograd.grad(o, xs, g.to(dt))]
    for name in ("reference32", "exact32", "triton32"):
        res[name] = {
            w: (a.double() - b).abs().max().item()
            for w, a, b in zip(("out", "dq", "dk", "dv"), outs[name], outs["float64"])
        }
    return res


# --------------------------------------------------------------------------- model
def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench_ms(fn, warmup_ms=25, rep_ms=200) -> float:
    """Median milliseconds of ``fn`` (triton's CUDA-event timer on the GPU)."""
    if DEVICE != "cuda":
        fn()
        return 1e3 * _sync_time(fn, 2)
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def _model(genes, backend):
    from tgem._model import TGEMNet

    net = TGEMNet(
        n_genes=genes,
        n_classes=10,
        n_layers=3,
        n_heads=5,
        attention_backend=BACKEND_NAMES.get(backend, backend),
        generator=torch.Generator().manual_seed(0),
    ).to(DEVICE)
    return net


def _data(batch, genes, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(batch, genes, generator=gen, device=DEVICE).abs() * 2
    y = torch.randint(0, 10, (batch,), generator=gen, device=DEVICE)
    return x, y


def train_step_s(genes, backend, batch, reps, warmup) -> float:
    batch = batch if DEVICE == "cuda" else SMOKE_BATCH[batch]
    from tgem._training import make_optimizer

    net = _model(genes, backend).train()
    opt = make_optimizer(net.parameters(), 1e-4)
    x, y = _data(batch, genes)

    def step():
        opt.zero_grad(set_to_none=True)
        F.nll_loss(net(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    return _sync_time(step, reps)


def inference_samples_per_s(genes, backend, batch, reps, warmup) -> float:
    batch = batch if DEVICE == "cuda" else SMOKE_BATCH[batch]
    net = _model(genes, backend).eval()
    x, _ = _data(batch, genes)

    def run():
        with torch.no_grad():
            net(x)

    for _ in range(warmup):
        run()
    return batch / _sync_time(run, reps)


def ig_s_per_sample(genes, backend, samples, reps, warmup=1) -> float:
    """Integrated Gradients, zero baseline, midpoint rule: ``samples * steps`` rows at once."""
    steps = IG_STEPS
    net = _model(genes, backend).eval()
    x, y = _data(samples, genes)
    alphas = (torch.arange(steps, device=DEVICE) + 0.5) / steps

    def run():
        path = (alphas[None, :, None] * x[:, None, :]).reshape(-1, genes).requires_grad_()
        logp = net(path).gather(1, y.repeat_interleave(steps)[:, None]).sum()
        (grad,) = torch.autograd.grad(logp, path)
        return x * grad.reshape(samples, steps, genes).mean(1)

    for _ in range(warmup):
        run()
    return _sync_time(run, reps) / samples


# ---------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    parser.add_argument("--genes", type=int, nargs="+", default=[1708, 22283])
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=15.0,
        help="skip a measurement predicted to take longer than this",
    )
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument(
        "--sweep-configs",
        type=json.loads,
        default=None,
        help='JSON list of {"BLOCK_M", "BLOCK_N", "num_warps"} to sweep',
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny CPU run through Triton's interpreter (TRITON_INTERPRET=1)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import triton

    from tgem._kernels import _triton as ta

    global DEVICE, INTERPRET
    if args.smoke:
        from tgem._kernels import Backend, register_backend

        global IG_STEPS
        DEVICE, INTERPRET, IG_STEPS = "cpu", True, 2
        args.genes = [24, 48]
        register_backend(
            Backend(
                "triton_interpreter",
                lambda q, k, v: ta.triton_attention(q, k, v, interpret=True),
                lambda device, dtype: None,
                priority=-10,
            )
        )
        BACKEND_NAMES["triton"] = "triton_interpreter"
    on_gpu = DEVICE == "cuda"
    result = {
        "gpu": torch.cuda.get_device_name(0) if on_gpu else "none (smoke test)",
        "sms": torch.cuda.get_device_properties(0).multi_processor_count if on_gpu else 0,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/bench_gpu.py", *(argv or [])]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        args.out.write_text(json.dumps(result, indent=1))

    t_start = time.perf_counter()
    result["probes"] = probe_rates()
    logger.info("probes: %s", result["probes"])
    save()
    rows, genes = (64 * 5, 1708) if on_gpu else (10, 24)
    # The probes also time the PTX instruction ex2.approx.ftz.f32 written out against tl.exp2
    # (exp2_per_s_ftz_asm, exp2_per_s): tgem's kernels use tl.exp2, which triton 3.6 compiles
    # to that instruction already (kernel_info's ex2_in_ptx shows what they compile to).
    if args.sweep_configs:
        SWEEP[:] = args.sweep_configs
    if not args.no_sweep:
        result["sweep"] = sweep(rows, genes)
        logger.info("chosen configs: %s", result["sweep"]["chosen"])
    if on_gpu:
        try:
            result["kernel_info"] = kernel_info()
        except Exception as exc:  # introspection differs between triton versions
            result["kernel_info"] = {"error": repr(exc)[:300]}
        logger.info("kernel info: %s", result["kernel_info"])
    result["config"] = {k: dict(v) for k, v in ta.CONFIG.items()}
    save()
    peak_exp = result["probes"]["exp2_peak_per_s"]
    peak_fma = result["probes"]["fp32_flops_per_s"]
    result["kernels"] = {}
    for g, n in ((1708, 320), (1708, 80), (22283, 80)) if on_gpu else ((24, 10),):
        timed = time_kernels(n, g)
        for name, r in timed.items():
            bound_s = max(n * g * g / peak_exp, FLOPS_PER_PAIR[name] * n * g * g / peak_fma)
            r["pct_of_roofline"] = 100 * bound_s / (r["ms"] * 1e-3)
            r["pct_of_exp2_peak"] = 100 * r["exp2_per_s"] / peak_exp
            r["pct_of_fp32_peak_67T"] = 100 * r["flops_per_s"] / 67e12
        result["kernels"][f"G{g}_rows{n}"] = timed
        logger.info(
            "kernels G=%d rows=%d: %s",
            g,
            n,
            {k: (round(v["ms"], 3), round(v["pct_of_roofline"], 1)) for k, v in timed.items()},
        )
        save()
    result["accuracy_G1708"] = kernel_accuracy(1708 if on_gpu else 24)
    save()

    result["model"] = {}
    first_g = args.genes[0]
    per_rep = {}  # (backend, item) -> seconds per repetition at the first gene count
    for g in args.genes:
        for backend in ("triton", "exact"):
            rec = result["model"].setdefault(f"G{g}", {}).setdefault(backend, {})
            ig_samples = 4 if g <= 5000 else 1
            items = {
                "train_step_s_batch64": lambda r, w, g=g, b=backend: train_step_s(g, b, 64, r, w),
                "train_step_s_batch16": lambda r, w, g=g, b=backend: train_step_s(g, b, 16, r, w),
                "inference_samples_per_s_batch64": lambda r, w, g=g, b=backend: (
                    inference_samples_per_s(g, b, 64, r, w)
                ),
                "ig_s_per_sample": lambda r, w, g=g, b=backend, n=ig_samples: ig_s_per_sample(
                    g, b, n, r, warmup=w
                ),
            }
            for key, fn in items.items():
                reps, warmup = (3, 1) if "ig" in key else (5, 2)
                if g != first_g:
                    if (backend, key) not in per_rep:
                        continue
                    predicted = per_rep[(backend, key)] * (g / first_g) ** 2
                    if "ig" in key:
                        predicted *= ig_samples / 4
                    if predicted > args.max_seconds:
                        rec[key] = {
                            "skipped": f"predicted {predicted:.1f} s per repetition "
                            f"(> --max-seconds {args.max_seconds})"
                        }
                        continue
                    reps, warmup = (3, 1) if predicted < 1.0 else (1, 0)
                t0 = time.perf_counter()
                try:
                    value = fn(reps, warmup)
                except torch.OutOfMemoryError as exc:
                    rec[key] = {"error": f"out of memory: {exc}"[:300]}
                    torch.cuda.empty_cache()
                    continue
                rec[key] = value
                if g == first_g:
                    per_rep[(backend, key)] = (
                        64 / value if "inference" in key else value * (4 if "ig" in key else 1)
                    )
                logger.info(
                    "G=%d %s %s: %.5g (%.1f s)", g, backend, key, value, time.perf_counter() - t0
                )
                save()
        m = result["model"][f"G{g}"]
        for backend in ("triton", "exact"):
            step = m[backend].get("train_step_s_batch64")
            if isinstance(step, float):
                m[backend]["train_samples_per_s_batch64"] = 64 / step
        tri, ex = m["triton"], m["exact"]
        m["speedup_triton_over_exact"] = {
            k: (tri[k] / ex[k] if "samples_per_s" in k else ex[k] / tri[k])
            for k in tri
            if isinstance(tri.get(k), float) and isinstance(ex.get(k), float)
        }
        if g == 1708 and "train_samples_per_s_batch64" in tri:
            m["train_speedup_vs_cpu_native_2core"] = (
                tri["train_samples_per_s_batch64"] / CPU_NATIVE_TRAIN_SAMPLES_PER_S
            )
        save()
    result["wall_s"] = time.perf_counter() - t_start
    save()
    _print_table(result)


def _print_table(result):
    print(
        f"\nGPU: {result['gpu']} ({result['sms']} SMs), torch {result['torch']}, "
        f"triton {result['triton']}"
    )
    p = result["probes"]
    print(
        f"probes: exp2 {p['exp2_peak_per_s'] / 1e12:.2f} T/s, "
        f"fp32 FMA {p['fp32_flops_per_s'] / 1e12:.1f} TFLOP/s"
    )
    for shape, ks in result["kernels"].items():
        for name, r in ks.items():
            print(
                f"kernel {shape:>16} {name:>15}: {r['ms']:8.3f} ms  "
                f"{r['exp2_per_s'] / 1e12:5.2f} Texp/s  {r['pct_of_roofline']:5.1f}% roofline"
                f"  {r['pct_of_fp32_peak_67T']:5.1f}% of 67 TFLOP/s"
            )
    for g, backends in result["model"].items():
        for backend, rec in backends.items():
            if isinstance(rec, dict):
                print(
                    f"model {g} {backend:>7}: "
                    + ", ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in rec.items()
                    )
                )
            else:
                print(f"model {g} {backend}: {rec}")


if __name__ == "__main__":
    main()
