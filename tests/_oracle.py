"""Shared helpers for testing fast attention paths against the plain reference formulation."""

import torch

from tgem._kernels import reference_attention


def attention_and_grads(fn, q, k, v, g):
    """Output and (dq, dk, dv) of ``fn`` for upstream gradient ``g`` (fresh leaves)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    return [out.detach(), *grads]


def float32_errors(fn, q, k, v, g, ref=reference_attention):
    """Max abs error against a float64 reference of ``fn`` in float32 and of ``ref`` in float32.

    Returns a list of (path_error, reference_error, scale) for the output and each gradient.
    The Standards ask path_error <= 2 * reference_error (plus a floor of a few float32 ulps of
    the terms' scale, for the cases where the reference happens to be exact).
    """
    exact64 = attention_and_grads(ref, q.double(), k.double(), v.double(), g.double())
    ref32 = attention_and_grads(ref, q.float(), k.float(), v.float(), g.float())
    path32 = attention_and_grads(fn, q.float(), k.float(), v.float(), g.float())
    # magnitude of the terms each result is summed from (the scale of its rounding errors)
    mq, mk, mv, mg = (float(t.abs().max()) for t in (q, k, v, g))
    scales = [mv, mg * mv * mk, mg * mv * mq, mg]
    rows = []
    for e, r, p, scale in zip(exact64, ref32, path32, scales):
        rows.append(
            (float((p.double() - e).abs().max()), float((r.double() - e).abs().max()), scale)
        )
    return rows


def assert_float32_rule(rows, floor_ulps=4):
    eps = torch.finfo(torch.float32).eps
    names = ["out", "dq", "dk", "dv"]
    for name, (err, ref_err, scale) in zip(names, rows):
        bound = 2 * ref_err + floor_ulps * eps * max(scale, 1e-30)
        assert err <= bound, (
            f"{name}: float32 error {err:.3g} exceeds 2 x reference error {ref_err:.3g} "
            f"(+ floor) at scale {scale:.3g}"
        )


def assert_float32_rms_rule(fn, q, k, v, g, ref=reference_attention, factor=2.0):
    """Root-mean-square float32 error of ``fn`` at most ``factor`` x the reference's, no floor.

    The max-error rule above needs a floor for tiny shapes where the plain formulation can be
    exact by luck; over a realistic number of genes the RMS error is a stable statistic, so
    here the Standards' bar applies as it stands, to the output and every gradient.
    """
    exact64 = attention_and_grads(ref, q.double(), k.double(), v.double(), g.double())
    ref32 = attention_and_grads(ref, q.float(), k.float(), v.float(), g.float())
    path32 = attention_and_grads(fn, q.float(), k.float(), v.float(), g.float())
    for name, e, r, p in zip(["out", "dq", "dk", "dv"], exact64, ref32, path32):
        err = float((p.double() - e).pow(2).mean().sqrt())
        ref_err = float((r.double() - e).pow(2).mean().sqrt())
        assert err <= factor * ref_err, (
            f"{name}: float32 RMS error {err:.3g} exceeds {factor} x the reference's {ref_err:.3g}"
        )
