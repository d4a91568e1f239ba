"""Triton HSTU kernel vs the PyTorch reference: outputs and gradients (q, k, v, bias).

``TRITON_INTERPRET=1`` must be set before triton is imported, and must not leak into
other tests. So this module runs itself as a script in a subprocess with the variable
set (see ``__main__`` below); the pytest side only reads the JSON it prints. Nothing
here imports triton in the pytest process. Shapes are tiny: the interpreter is ~5000x
slower than torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# name: (B, N, H, Dqk, Dv, valid_start per row). N=70 gives two 64-wide tiles, so the
# block loops, the diagonal tile and the skip of a fully padded first tile all run.
CASES: dict[str, tuple[int, int, int, int, int, list[int]]] = {
    "one_tile_ragged": (2, 37, 2, 8, 12, [0, 20]),
    "exact_tile": (1, 16, 1, 16, 16, [3]),
    "two_tiles": (2, 70, 1, 4, 8, [0, 66]),
}
TOLERANCE = 1e-5  # fp32 max |kernel - reference| relative to max |reference|
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def parity() -> dict[str, dict[str, float]]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=240, check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tensor", ["out", "dq", "dk", "dv", "dbias"])
def test_kernel_matches_reference(parity: dict[str, dict[str, float]], case: str, tensor: str) -> None:
    assert parity[case][tensor] < TOLERANCE


@pytest.mark.parametrize("tensor", ["out", "dx", "d_uvqk", "d_rab"])
def test_encoder_on_triton_matches_pytorch(parity: dict[str, dict[str, float]], tensor: str) -> None:
    """The whole encoder: dbias reaches the rab tables through the same gather on both paths."""
    assert parity["encoder"][tensor] < TOLERANCE


def _relative_error(got, want) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


def _run_cases() -> dict[str, dict[str, float]]:
    """Runs in the subprocess, with TRITON_INTERPRET=1 already in the environment."""
    import torch

    from streamtrain.modules.config import HSTUConfig
    from streamtrain.modules.hstu import HSTUEncoder
    from streamtrain.ops.hstu_attention import Kernel, hstu_attention

    results: dict[str, dict[str, float]] = {}
    g = torch.Generator().manual_seed(0)
    for name, (b, n, h, dqk, dv, start) in CASES.items():
        # q, k, v as strided views of one fused projection output, bias permuted: like the module.
        uvqk = torch.randn(b, n, h * (2 * dqk + dv), generator=g)
        q_, k_, v_ = uvqk.split([h * dqk, h * dqk, h * dv], dim=-1)
        bias_ = torch.randn(h, b, n, n, generator=g).transpose(0, 1)
        inputs = [t.detach().requires_grad_(True) for t in (q_, k_, v_, bias_)]
        grad_out = torch.randn(b, n, h, dv, generator=g)
        per_kernel = {}
        for kernel in (Kernel.PYTORCH, Kernel.TRITON):
            q, k, v, bias = (t.view(b, n, h, -1) if t.dim() == 3 else t for t in inputs)
            out = hstu_attention(q, k, v, bias, torch.tensor(start), alpha=0.4, inv_n=1 / n, kernel=kernel)
            per_kernel[kernel] = (out, *torch.autograd.grad(out, inputs, grad_out))
        pairs = zip(("out", "dq", "dk", "dv", "dbias"), per_kernel[Kernel.PYTORCH], per_kernel[Kernel.TRITON])
        results[name] = {key: _relative_error(tri, ref) for key, ref, tri in pairs}

    # The whole encoder (rab gather, norms, gating) on both kernels with the same weights.
    x = torch.randn(3, 10, 8, generator=g)
    ts = 1_700_000_000_000 + torch.randint(1, 10**7, (3, 10), generator=g).cumsum(1)
    valid_len = torch.tensor([10, 4, 1])
    grads = {}
    for kernel in ("pytorch", "triton"):
        torch.manual_seed(1)
        enc = HSTUEncoder(HSTUConfig(num_heads=2, qk_dim=4, v_dim=4, kernel=kernel), 8, max_len=12)
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(0.1 * torch.randn_like(p))
        x_in = x.clone().requires_grad_(True)
        out = enc(x_in, ts, valid_len)
        out.square().sum().backward()
        grads[kernel] = {
            "out": out,
            "dx": x_in.grad,
            "d_uvqk": torch.cat([layer.uvqk.weight.grad.flatten() for layer in enc.layers]),
            "d_rab": torch.cat([torch.cat([layer.rab.pos.grad.flatten(), layer.rab.time.grad.flatten()])
                                for layer in enc.layers]),
        }
    results["encoder"] = {key: _relative_error(grads["triton"][key], grads["pytorch"][key]) for key in grads["pytorch"]}
    return results


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run through pytest, or with TRITON_INTERPRET=1 on a CPU-only host")
    print(json.dumps(_run_cases()))
