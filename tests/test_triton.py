"""The Triton kernels against the reference formulation, through Triton's interpreter (CPU).

Triton reads ``TRITON_INTERPRET`` once, when it is first imported, and other test modules may
import it first; so the kernels run in one fresh subprocess started with
``TRITON_INTERPRET=1`` (this file, run as a script with ``--worker``), which computes every
case's errors against float64 and prints them as JSON. The tests below check those numbers.

Tolerance: for each output (forward, dq, dk, dv) the kernel's largest absolute error against
float64 must be at most twice the plain float32 formulation's own error, plus a floor of
``FLOOR_ULPS`` float32 ulps of the largest float64 value. The floor is needed because on tiny
cases the float32 reference can be exact by luck (G=1 gives exactly 0) while the kernels sum
in another order (register tiles, then a tree); differences in summation order over at most
64 terms stay within a few tens of ulps of the largest term, whereas any wrong term (a
missing diagonal, a wrong shift) moves the result by about 1/G of its scale, i.e. 1e-2 to 1.

Sharp softmax rows (``*_sharp``, |q k| in the hundreds) are the exception for the gradients:
the exact algorithm (``tgem._kernels._exact.exact_backward`` and these kernels alike) forms
``dk_j = v_j sum_i A_ij g_i q_i - sum_i A_ij g_i q_i out_i`` and
``dq_i = g_i (sum_j A_ij k_j v_j - out_i sum_j A_ij k_j)``, which cancel when a row is
one-hot (``out_i ~ v_j``), while the reference multiplies by ``v_j - out_i`` term by term.
There the bound is twice the larger of the reference's and the pure-PyTorch exact path's
float32 errors, and the floor counts ulps of the two cancelling sums (computed in float64)
rather than of the tiny result: rounding of those sums is all either float32 path can
promise. The forward output of sharp cases is still held to the strict bound, which is what
catches a wrong row maximum (overflow to inf, or rows summing to 0).

When ``TGEM_REQUIRE_TRITON=1`` (CI), a missing triton fails these tests instead of skipping.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._triton_interp import require_triton, run_interpreted

REPO = Path(__file__).resolve().parents[1]
FLOOR_ULPS = 64
EPS32 = float(torch.finfo(torch.float32).eps)

# name: (batch, heads, genes, scale of q and k, kind). The interpreter's tiles are 16 x 8:
# G=17 and 37 leave ragged ends, G=64 fills whole tiles, G=1 and 2 are the degenerate ends.
CASES = {
    "g1": (1, 1, 1, 1.0, "normal"),
    "g2": (2, 1, 2, 1.0, "normal"),
    "g17_batch_heads": (2, 3, 17, 1.0, "normal"),
    "g37_odd": (3, 2, 37, 1.0, "normal"),
    "g64_full_tiles": (1, 2, 64, 1.0, "normal"),
    "g17_sharp": (2, 2, 17, 12.0, "normal"),  # |q k| up to ~500: one-hot softmax rows
    "g33_sharp": (1, 2, 33, 30.0, "normal"),
    "g17_equal_inputs": (2, 2, 17, 1.0, "equal"),  # all scores equal: uniform rows
    "g24_noncontiguous": (2, 3, 24, 1.0, "noncontiguous"),
    "g0_empty_batch": (0, 2, 5, 1.0, "normal"),
}


@pytest.fixture(scope="module")
def triton_ok():
    require_triton()


@pytest.fixture(scope="module")
def interpreted(triton_ok):
    """Errors of every case, computed once in a subprocess that runs the interpreter."""
    return run_interpreted(__file__, "--worker")


def _assert_within(errors: dict, name: str):
    sharp = name.endswith("_sharp")
    for what, (err_kernel, err_ref32, err_exact32, scale, terms) in errors.items():
        base = err_ref32
        if sharp and what in ("dq", "dk"):
            base, scale = max(err_ref32, err_exact32), terms
        bound = 2.0 * base + FLOOR_ULPS * EPS32 * scale
        assert err_kernel <= bound, (
            f"{name}: {what} error {err_kernel:.3g} > bound {bound:.3g} (float32 reference "
            f"error {err_ref32:.3g}, exact path {err_exact32:.3g}, scale {scale:.3g})"
        )


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_match_reference(interpreted, name):
    result = interpreted[name]
    _assert_within(result["errors"], name)
    # outputs that must be finite and were all written (poisoned with NaN before the call)
    assert result["all_finite"], f"{name}: the kernels left NaN/inf in an output"


@pytest.mark.parametrize("name", ["g17_batch_heads", "g37_odd", "g17_sharp"])
def test_inference_kernel_matches_training_kernel(interpreted, name):
    # the forward without gradient accumulators computes Z and out in the same order
    assert interpreted[name]["nograd_vs_grad_forward"] == 0.0


def test_interpreter_runs_in_process_only_when_triton_was_imported_for_it(triton_ok):
    from tgem._kernels._triton import _interpreter_mode, triton_attention

    q = torch.randn(1, 1, 4)
    if _interpreter_mode():  # the whole pytest run was started with TRITON_INTERPRET=1
        assert triton_attention(q, q, q).shape == q.shape
    else:
        with pytest.raises(ValueError, match="CUDA tensors"):
            triton_attention(q, q, q)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            triton_attention(q, q, q, interpret=True)


def test_rejects_bad_inputs(triton_ok):
    from tgem._kernels._triton import triton_attention

    with pytest.raises(TypeError, match="float32"):
        triton_attention(*torch.randn(3, 1, 1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        triton_attention(torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.randn(1, 1, 5))


def test_backend_claims_only_cuda_float32():
    from tgem._kernels import backend_status, resolve_backend
    from tgem._kernels._triton import triton_unavailable

    assert "triton" in backend_status("cpu")
    assert backend_status("cpu")["triton"] is not None
    assert triton_unavailable(torch.device("cpu"), torch.float32) is not None
    assert triton_unavailable(torch.device("cuda"), torch.float64) is not None
    assert resolve_backend("auto", "cpu").name != "triton"
    with pytest.raises(ValueError, match="triton"):
        resolve_backend("triton", "cpu")


def test_module_imports_and_reports_when_triton_is_missing():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from tgem._kernels import backend_status, resolve_backend\n"
        "from tgem._kernels import _triton as m\n"
        "reason = m.triton_unavailable(torch.device('cuda'), torch.float32)\n"
        "assert 'tgem[gpu]' in reason, reason\n"
        "assert backend_status('cuda')['triton'] == reason\n"
        "assert resolve_backend('auto', 'cuda').name != 'triton'\n"
        "try:\n"
        "    m.triton_attention(*torch.randn(3, 1, 1, 4))\n"
        "except ImportError as exc:\n"
        "    assert 'triton' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
        "print('ok')\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ---------------------------------------------------------------------- the worker
def _inputs(batch, heads, genes, scale, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, genes)
    if kind == "equal":
        q, k, v = (torch.full(shape, c, dtype=torch.float64) for c in (0.7, -1.3, 0.4))
    elif kind == "noncontiguous":
        q, k, v = (
            torch.randn((batch, genes, heads), generator=gen, dtype=torch.float64).transpose(1, 2)
            for _ in range(3)
        )
    else:
        q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    q, k = q * scale, k * scale
    return [x.float() for x in (q, k, v)]  # the float32 inputs all paths share


def _grads(fn, inputs, upstream):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, upstream.to(out.dtype))
    return [out.detach(), *grads]


def _cancelling_terms(q, k, v, g, out):
    """Largest magnitude of the sums the exact algorithm subtracts, per output (float64)."""
    from tgem._kernels import reference_softmax

    q, k, v, g = (x.double() for x in (q, k, v, g))
    if q.numel() == 0:
        return dict.fromkeys(("out", "dq", "dk", "dv"), 0.0)
    a = reference_softmax(q, k)
    am = a.clone()
    am.diagonal(dim1=-2, dim2=-1).zero_()
    dq = g.abs() * (
        (am @ (k * v).unsqueeze(-1)).squeeze(-1).abs()
        + out.abs() * (a @ k.unsqueeze(-1)).squeeze(-1).abs()
    )
    gq = (g * q).unsqueeze(-2)
    dk = v.abs() * (gq @ am).squeeze(-2).abs() + ((gq * out.unsqueeze(-2)) @ a).squeeze(-2).abs()
    return {"out": 0.0, "dq": dq.max().item(), "dk": dk.max().item(), "dv": 0.0}


def _worker_case(batch, heads, genes, scale, kind, seed):
    from tgem._kernels import exact_attention, reference_attention
    from tgem._kernels._triton import triton_attention

    q, k, v = _inputs(batch, heads, genes, scale, kind, seed)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    exact = _grads(reference_attention, [x.double() for x in (q, k, v)], upstream.double())
    ref32 = _grads(reference_attention, [q, k, v], upstream)
    exact32 = _grads(exact_attention, [q, k, v], upstream)
    kernel = _grads(triton_attention, [q, k, v], upstream)
    terms = _cancelling_terms(q, k, v, upstream, exact[0])
    errors = {}
    for what, e64, r32, x32, kern in zip(("out", "dq", "dk", "dv"), exact, ref32, exact32, kernel):
        if e64.numel() == 0:
            errors[what] = [0.0] * 5
            continue
        errors[what] = [(t.double() - e64).abs().max().item() for t in (kern, r32, x32)]
        errors[what] += [e64.abs().max().item(), terms[what]]
    with torch.no_grad():
        nograd = triton_attention(q, k, v)
    return {
        "errors": errors,
        "all_finite": all(bool(torch.isfinite(t).all()) for t in kernel),
        "nograd_vs_grad_forward": (nograd - kernel[0]).abs().max().item() if q.numel() else 0.0,
    }


def _worker_main():
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from tgem._kernels import _triton

    assert isinstance(tl.zeros, InterpretedFunction), "worker needs TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    _triton._empty = lambda x: torch.full_like(x, float("nan"))
    results = {
        name: _worker_case(*case, seed=index)
        for index, (name, case) in enumerate(sorted(CASES.items()))
    }
    print(json.dumps(results))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()
