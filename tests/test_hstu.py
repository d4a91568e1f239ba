"""HSTU attention reference, dispatch, and the encoder's mask / padding / causality contract."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from streamtrain.modules.config import HSTUConfig
from streamtrain.modules.hstu import HSTUEncoder, RelativeAttentionBias, time_gap_buckets
from streamtrain.modules.meanpool import MeanPoolEncoder
from streamtrain.ops.hstu_attention import Kernel, hstu_attention, resolve_kernel, softmax_attention

T0 = 1_700_000_000_000


def _loop_attention(q, k, v, bias, start, alpha, inv_n, softmax):
    """Element-by-element attention: the definition, independent of any tensor trick."""
    b_, n, h_, _ = q.shape
    out = torch.zeros(b_, n, h_, v.shape[-1], dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            for i in range(n):
                keys = list(range(int(start[b]), i + 1))
                if not keys:
                    continue
                s = torch.stack([alpha * q[b, i, h].double() @ k[b, j, h].double() + bias[b, h, i, j] for j in keys])
                w = torch.softmax(s, 0) if softmax else F.silu(s) * inv_n
                out[b, i, h] = sum(w[t] * v[b, j, h].double() for t, j in enumerate(keys))
    return out


@pytest.mark.parametrize("softmax", [False, True], ids=["pointwise", "softmax"])
def test_reference_matches_the_definition(softmax: bool) -> None:
    g = torch.Generator().manual_seed(0)
    b, n, h, dqk, dv = 3, 6, 2, 3, 4
    q, k = torch.randn(b, n, h, dqk, generator=g), torch.randn(b, n, h, dqk, generator=g)
    v, bias = torch.randn(b, n, h, dv, generator=g), torch.randn(b, h, n, n, generator=g)
    start = torch.tensor([0, 2, 6])  # full row, left-padded row, all-padding row
    if softmax:
        got = softmax_attention(q, k, v, bias, start, alpha=0.7)
    else:
        got = hstu_attention(q, k, v, bias, start, alpha=0.7, inv_n=1 / 9)
    want = _loop_attention(q, k, v, bias, start, 0.7, 1 / 9, softmax)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert not got[1, :2].any() and not got[2].any()  # padded queries are exact zeros


def test_softmax_rows_without_keys_have_finite_gradients() -> None:
    q = torch.randn(1, 4, 1, 2, requires_grad=True)
    out = softmax_attention(q, q, q, torch.zeros(1, 1, 4, 4), torch.tensor([3]), alpha=1.0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_time_gap_buckets_are_log2_of_seconds() -> None:
    ts = torch.tensor([[T0, T0 + 999, T0 + 1_000, T0 + 3_000, T0 + 10**12]])
    got = time_gap_buckets(ts, unit_ms=1000, num_buckets=8)[0, 0]  # gaps from the first event
    # log2(1 + Δs): 0, 0.999 s → 0, 1 s → 1, 3 s → 2, 31 years → capped at 7
    assert got.tolist() == [0, 0, 1, 2, 7]
    assert torch.equal(time_gap_buckets(ts, 1000, 8), time_gap_buckets(ts, 1000, 8).transpose(1, 2))


def test_relative_bias_reads_distance_and_time_tables() -> None:
    rab = RelativeAttentionBias(num_heads=2, max_len=5, time_buckets=4)
    with torch.no_grad():
        rab.pos.copy_(torch.randn(2, 5))
        rab.time.copy_(torch.randn(2, 4))
    pos = torch.arange(5)
    distance = (pos[:, None] - pos[None, :]).clamp(min=0)
    bucket = torch.randint(0, 4, (3, 5, 5))
    got = rab(distance, bucket)  # (3, 2, 5, 5)
    for b, h, i, j in [(0, 0, 4, 1), (2, 1, 3, 3), (1, 1, 2, 0)]:
        assert got[b, h, i, j] == rab.pos[h, i - j] + rab.time[h, bucket[b, i, j]]


ENCODER_CONFIGS = {
    "default": HSTUConfig(num_heads=2, qk_dim=4, v_dim=4),
    "softmax_rms_postnorm": HSTUConfig(
        num_heads=2, qk_dim=4, v_dim=4, attention="softmax", norm="rmsnorm", pre_norm=False
    ),
    "u_only_gelu": HSTUConfig(num_heads=1, qk_dim=4, v_dim=6, activation="gelu", activate_qkv=False),
}


def _encoder(cfg: HSTUConfig, dim: int = 8, max_len: int = 16) -> HSTUEncoder:
    torch.manual_seed(0)
    enc = HSTUEncoder(cfg, dim, max_len).eval()
    with torch.no_grad():  # rab starts at zero; make it matter
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc


def _sequences(b: int, n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, dim, generator=g)
    ts = T0 + torch.randint(1, 10**7, (b, n), generator=g).cumsum(1)
    valid_len = torch.tensor([n, 1, n // 2, 3][:b])
    return x, ts, valid_len


@pytest.mark.parametrize("groups", [1, 4], ids=["masked", "grouped"])  # one group: padding inside the pass
@pytest.mark.parametrize("cfg", ENCODER_CONFIGS.values(), ids=ENCODER_CONFIGS.keys())
def test_padding_never_reaches_real_positions(cfg: HSTUConfig, groups: int) -> None:
    enc = _encoder(cfg.model_copy(update={"length_groups": groups}))
    x, ts, valid_len = _sequences(4, 7, 8)
    out = enc(x, ts, valid_len)
    real = torch.arange(7)[None, :] >= (7 - valid_len)[:, None]  # (B, N)
    assert not out[~real].any()

    # Junk in the padded slots, and five more junk columns on the left: same real outputs.
    junk = ~real[..., None]
    x2 = torch.cat([torch.randn(4, 5, 8), torch.where(junk, torch.randn_like(x), x)], 1)
    ts2 = torch.cat([torch.randint(0, 10**6, (4, 5)), torch.where(~real, 0, ts)], 1)
    out2 = enc(x2, ts2, valid_len)
    torch.testing.assert_close(out2[:, 5:], out, atol=1e-5, rtol=1e-5)
    assert not out2[:, :5].any()


@pytest.mark.parametrize("cfg", ENCODER_CONFIGS.values(), ids=ENCODER_CONFIGS.keys())
def test_outputs_do_not_depend_on_the_future(cfg: HSTUConfig) -> None:
    enc = _encoder(cfg)
    x, ts, valid_len = _sequences(4, 7, 8)
    out = enc(x, ts, valid_len)
    t = 4
    x2, ts2 = x.clone(), ts.clone()
    x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
    ts2[:, t + 1 :] += 10**9
    out2 = enc(x2, ts2, valid_len)
    torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1])
    assert not torch.allclose(out2[0, t + 1 :], out[0, t + 1 :])  # the future did change the future


def test_length_groups_match_one_padded_pass() -> None:
    grouped = _encoder(HSTUConfig(num_heads=2, qk_dim=4, v_dim=4, length_groups=3))
    single = _encoder(HSTUConfig(num_heads=2, qk_dim=4, v_dim=4, length_groups=1))
    single.load_state_dict(grouped.state_dict())
    x, ts, _ = _sequences(4, 9, 8)
    valid_len = torch.tensor([2, 9, 5, 5])
    torch.testing.assert_close(grouped(x, ts, valid_len), single(x, ts, valid_len), atol=1e-6, rtol=1e-5)


def test_encoder_trains_every_parameter() -> None:
    enc = _encoder(HSTUConfig(num_layers=2, num_heads=2, qk_dim=4, v_dim=4)).train()
    x, ts, valid_len = _sequences(4, 7, 8)
    enc(x, ts, valid_len).square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_encoder_rejects_sequences_longer_than_max_len() -> None:
    enc = _encoder(HSTUConfig(num_heads=1, qk_dim=4, v_dim=4), max_len=5)
    x, ts, valid_len = _sequences(1, 6, 8)
    with pytest.raises(ValueError, match="max_len"):
        enc(x, ts, valid_len[:1])


def test_auto_kernel_is_a_fixed_policy() -> None:
    assert resolve_kernel("auto", torch.device("cpu")) is Kernel.PYTORCH
    assert resolve_kernel("auto", torch.device("cuda")) is Kernel.TRITON
    assert resolve_kernel("pytorch", torch.device("cuda")) is Kernel.PYTORCH
    assert resolve_kernel("triton", torch.device("cpu")) is Kernel.TRITON


def test_missing_triton_raises_instead_of_falling_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "streamtrain.ops.triton.triton_hstu_attention", None)  # import → ImportError
    q = torch.randn(1, 3, 1, 2)
    with pytest.raises(ImportError, match="kernel=pytorch"):
        hstu_attention(q, q, q, torch.zeros(1, 1, 3, 3), torch.tensor([0]), alpha=1.0, inv_n=1.0, kernel=Kernel.TRITON)


def test_no_triton_kernel_for_softmax_attention() -> None:
    with pytest.raises(ValidationError, match="pointwise"):
        HSTUConfig(attention="softmax", kernel="triton")


def test_attention_checks_shapes() -> None:
    q = torch.randn(2, 3, 1, 2)
    with pytest.raises(ValueError, match="bias"):
        hstu_attention(q, q, q, torch.zeros(1, 1, 3, 3), torch.tensor([0, 0]), alpha=1.0, inv_n=math.nan)


@pytest.mark.parametrize("groups", [1, 3], ids=["one_crop", "grouped"])
@pytest.mark.parametrize("cfg", ENCODER_CONFIGS.values(), ids=ENCODER_CONFIGS.keys())
def test_shared_histories_with_targets_match_full_sequences(cfg: HSTUConfig, groups: int) -> None:
    """Each history encoded once and read by several targets == the full (history, target)
    sequence per row, at every history position and at the target; empty histories too."""
    enc = _encoder(cfg.model_copy(update={"length_groups": groups}))
    hist, ts, _ = _sequences(4, 7, 8)
    valid_len = torch.tensor([7, 0, 3, 1])
    owner = torch.tensor([2, 0, 0, 1, 3, 2, 2])  # history 2 read by three targets
    target = torch.randn(7, 8, generator=torch.Generator().manual_seed(5))
    target_ts = ts[owner, -1] + torch.tensor([1, 10**4, 10**6, 5, 10**8, 0, 10**3])
    history_out, target_out = enc.forward_with_targets(hist, ts, valid_len, owner, target, target_ts)

    full = enc(torch.cat([hist[owner], target[:, None]], 1), torch.cat([ts[owner], target_ts[:, None]], 1),
               valid_len[owner] + 1)
    torch.testing.assert_close(target_out, full[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(history_out[owner], full[:, :-1], atol=1e-5, rtol=1e-5)
    assert not history_out[1].any()  # the empty history stays zero


def test_meanpool_with_targets_matches_full_sequences() -> None:
    enc = MeanPoolEncoder(8, "layernorm")
    hist, ts, _ = _sequences(3, 5, 8)
    valid_len, owner = torch.tensor([5, 0, 2]), torch.tensor([1, 2, 2, 0])
    target = torch.randn(4, 8)
    history_out, target_out = enc.forward_with_targets(hist, ts, valid_len, owner, target, ts[owner, -1])
    full = enc(torch.cat([hist[owner], target[:, None]], 1), torch.cat([ts[owner], ts[owner, -1:]], 1), valid_len[owner] + 1)
    torch.testing.assert_close(target_out, full[:, -1])
    torch.testing.assert_close(history_out[owner], full[:, :-1])
