"""Forward + backward time of one HSTU layer: ours vs a naive PyTorch reference.

    python -m bench.hstu [--quick] [--threads N]

Ours is ``streamtrain.modules.hstu.HSTUEncoder`` with one layer: rows in length groups
cropped to their longest row (padding skipped, not masked), one fused U/V/Q/K projection,
α on Q and 1/n on the output instead of on the (L, L) scores, bias added in place. The
reference below is the textbook way to write the same layer: four projections, the bucket
and distance matrices recomputed and gathered by advanced indexing, the mask applied with
``torch.where``, the 1/n as a separate division, every row at full length. Both get the same
weights and inputs (B, L, d), and must agree before anything is timed.

On a CUDA host the Triton kernel path of our layer is timed too. The last line printed
is one JSON object; ``ours_ms``/``reference_ms``/``ratio`` (reference / ours) are for L=200
with history lengths uniform in 1..L (what a stream of users looks like); ``results`` also
has every row full ("full"), where skipping padding cannot help.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import announce_quick, interleaved, machine_info, parser, print_result, rounded, timed
from streamtrain.modules.config import HSTUConfig
from streamtrain.modules.hstu import HSTUEncoder

B, D, HEADS = 32, 64, 2
TIME_BUCKETS, UNIT_MS = 32, 1000


class NaiveHSTULayer(nn.Module):
    """The same computation as one HSTULayer, written without any of its shortcuts."""

    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.heads, self.dh, self.max_len = heads, dim // heads, max_len
        self.norm_in = nn.LayerNorm(dim)
        self.f_u, self.f_v, self.f_q, self.f_k = (nn.Linear(dim, dim) for _ in range(4))
        self.pos_w = nn.Parameter(torch.zeros(heads, max_len))
        self.time_w = nn.Parameter(torch.zeros(heads, TIME_BUCKETS))
        self.norm_attn = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    @torch.no_grad()
    def copy_from(self, ours: HSTUEncoder) -> NaiveHSTULayer:
        """Take the weights of a one-layer HSTUEncoder, so both compute the same function."""
        layer = ours.layers[0]
        fused = zip(layer.uvqk.weight.chunk(4), layer.uvqk.bias.chunk(4))
        for f, (w, bias) in zip((self.f_u, self.f_v, self.f_q, self.f_k), fused):
            f.weight.copy_(w)
            f.bias.copy_(bias)
        for mine, theirs in ((self.norm_in, layer.norm), (self.norm_attn, layer.norm_attn), (self.out, layer.out),
                             (self.norm_out, ours.norm_out)):
            mine.load_state_dict(theirs.state_dict())
        self.pos_w.copy_(layer.rab.pos)
        self.time_w.copy_(layer.rab.time)
        return self

    def forward(self, x: torch.Tensor, ts: torch.Tensor, valid_len: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm_in(x)
        u, v, q, k = (F.silu(f(h)).view(b, n, self.heads, self.dh) for f in (self.f_u, self.f_v, self.f_q, self.f_k))
        i = torch.arange(n, device=x.device)[:, None].expand(n, n)
        j = torch.arange(n, device=x.device)[None, :].expand(n, n)
        dist = (i - j).clamp(min=0)
        gap = (ts[:, :, None] - ts[:, None, :]).abs().float() / UNIT_MS
        bucket = torch.log2(1.0 + gap).floor().long().clamp(max=TIME_BUCKETS - 1)
        bias = self.pos_w[:, dist][None] + self.time_w[:, bucket].permute(1, 0, 2, 3)  # (B, H, N, N)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(self.dh) + bias
        start = (n - valid_len)[:, None, None, None]
        mask = (j[None, None] <= i[None, None]) & (j[None, None] >= start)
        attn = torch.where(mask, F.silu(scores), torch.zeros_like(scores)) / self.max_len
        y = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, n, -1)
        x = x + self.out(self.norm_attn(y) * u.reshape(b, n, -1))
        real = (j[:1] >= (n - valid_len)[:, None]).unsqueeze(-1)
        return self.norm_out(x) * real


def _inputs(
    n: int, lengths: str, device: torch.device, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, n, D), increasing ts (B, n), valid_len (B,): uniform in 1..n, or all n ("full")."""
    x = torch.randn(B, n, D, generator=gen).to(device).requires_grad_(True)
    gaps = torch.randint(1_000, 3_600_000, (B, n), generator=gen)
    ts = (1_700_000_000_000 + gaps.cumsum(1)).to(device)
    valid_len = torch.randint(1, n + 1, (B,), generator=gen) if lengths == "uniform" else torch.full((B,), n)
    return x, ts, valid_len.to(device)


def _time_pair(
    ours: Callable[[], None], reference: Callable[[], None], repeats: int, device: torch.device
) -> tuple[float, float]:
    """Best-of-``repeats`` wall ms of each step, interleaved (common.interleaved), after two
    untimed rounds; on CUDA the device is synchronised around every timed step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = interleaved({"ours": timed(lambda _: ours(), sync), "reference": timed(lambda _: reference(), sync)},
                        repeats, warmup=2)
    return 1e3 * min(times["ours"]), 1e3 * min(times["reference"])


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, ts: torch.Tensor, valid_len: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x, ts, valid_len).square().mean().backward()

    return step


def _bench_case(n: int, lengths: str, repeats: int, gen: torch.Generator) -> dict[str, float | int | str]:
    cpu = torch.device("cpu")
    cfg = HSTUConfig(num_layers=1, num_heads=HEADS, qk_dim=D // HEADS, v_dim=D // HEADS, kernel="pytorch",
                     length_groups=4)  # what this benchmark measures: grouping at L=200
    ours = HSTUEncoder(cfg, D, max_len=n)
    naive = NaiveHSTULayer(D, HEADS, max_len=n).copy_from(ours)
    x, ts, valid_len = _inputs(n, lengths, cpu, gen)
    with torch.no_grad():  # same function, or the timing comparison means nothing
        max_diff = (ours(x, ts, valid_len) - naive(x, ts, valid_len)).abs().max().item()
    if max_diff > 1e-4:
        raise SystemExit(f"ours and the reference disagree (max |diff| {max_diff:.2e}): timings would be meaningless")
    ours_ms, reference_ms = _time_pair(
        _fwd_bwd(ours, x, ts, valid_len), _fwd_bwd(naive, x, ts, valid_len), repeats, cpu
    )
    row: dict[str, float | int | str] = {
        "L": n,
        "lengths": lengths,
        "max_abs_diff": max_diff,
        "ours_ms": ours_ms,
        "reference_ms": reference_ms,
        "ratio": reference_ms / ours_ms,
    }
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        xg, tsg, vg = _inputs(n, lengths, cuda, gen)
        naive_cuda = _fwd_bwd(NaiveHSTULayer(D, HEADS, n).copy_from(ours).to(cuda), xg, tsg, vg)
        for kernel in ("pytorch", "triton"):
            layer = HSTUEncoder(cfg.model_copy(update={"kernel": kernel}), D, max_len=n).to(cuda)
            row[f"cuda_{kernel}_ms"], row["cuda_naive_ms"] = _time_pair(
                _fwd_bwd(layer, xg, tsg, vg), naive_cuda, repeats, cuda
            )
    return row


def main() -> None:
    cli = parser(__doc__, "fewer repeats (< 1 minute on 2 CPU cores)")
    cli.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on a shared 2-core box two threads mostly measure contention)",
    )
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 20
    if args.quick:
        announce_quick({"repeats": repeats})
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    results = []
    for lengths in ("full", "uniform"):
        for n in (50, 200):
            results.append(_bench_case(n, lengths, repeats, gen))
            row = results[-1]
            print(
                f"L={n:4d} {lengths:7s}  reference {row['reference_ms']:8.2f} ms   ours {row['ours_ms']:8.2f} ms   "
                f"ratio {row['ratio']:.2f}x   max|diff| {row['max_abs_diff']:.1e}"
                + "".join(f"   {k} {v:.2f}" for k, v in row.items() if k.startswith("cuda_"))
            )
    last = results[-1]
    print_result({
        "bench": "hstu_layer_fwd_bwd",
        "B": B, "d": D, "heads": HEADS, "repeats": repeats,
        "machine": machine_info(with_torch=True),
        "ours_ms": rounded(last["ours_ms"]),
        "reference_ms": rounded(last["reference_ms"]),
        "ratio": rounded(last["ratio"]),
        "results": [{k: rounded(v) if k.endswith(("_ms", "ratio")) else v for k, v in r.items()} for r in results],
    })


if __name__ == "__main__":
    main()
