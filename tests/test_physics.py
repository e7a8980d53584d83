"""The simulator's physics against published measurements and the directions they show.

The ML.ENERGY rows are the calibration (each within 5%); the rest are the qualitative
claims from the literature (decode barely cares about clocks, prefill is proportional
to them, caps cost decode little and prefill a lot) and the properties the policies
rely on (power never above the limit, more power never fewer tokens, vectorised calls
equal scalar ones).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from wattkeeper.simulator import physics, whatif

H100 = physics.GPU_KINDS["h100"]
A100 = physics.GPU_KINDS["a100"]
B8 = physics.MODELS["llama-8b"]
B70 = physics.MODELS["llama-70b"]
B405 = physics.MODELS["llama-405b-fp8"]
KINDS_MODELS = [(k, m) for k in (H100, A100) for m in physics.MODELS.values() if m.supports(k)]
TOLERANCE = 0.05


def op(kind: physics.GpuKind = H100, model: physics.ModelProfile = B8, **kw: object):
    kw.setdefault("batch", 64)
    return physics.operating_point(kind, model, **kw)  # type: ignore[arg-type]


# --- calibration -------------------------------------------------------------------


def test_every_mlenergy_row_within_tolerance():
    cal = whatif.calibration()
    assert cal["source"].startswith("SOURCE:")
    assert cal["skipped"] == []
    models = [r["model"] for r in cal["rows"]]
    assert models.count("Llama-3.1-8B") == 10
    assert models.count("Llama-3.1-70B") == 11
    assert models.count("Llama-3.1-405B-FP8") == 7
    bad = [
        (r["model"], r["batch"], r["tokens_rel_error"], r["power_rel_error"])
        for r in cal["rows"]
        if abs(r["tokens_rel_error"]) > TOLERANCE or abs(r["power_rel_error"]) > TOLERANCE
    ]
    assert not bad
    assert cal["max_abs_rel_error"] <= TOLERANCE


def test_large_8b_batches_are_power_limited_at_about_688_w():
    """ML.ENERGY: 685-691 W at batch >= 192 under the 700 W limit."""
    o = op(batch=np.array([192, 256, 384, 512, 768]))
    assert np.all(o.power_capped)
    np.testing.assert_allclose(o.power_w, 688, atol=4)
    assert np.all(o.effective_clock_mhz < H100.max_sm_clock_mhz)


def test_between_rows_the_model_interpolates():
    """No lookup table: batches between measured rows land between their neighbours."""
    for model, lo, mid, hi in [(B8, 64, 80, 96), (B70, 256, 320, 384)]:
        t = op(model=model, batch=np.array([lo, mid, hi])).decode_tokens_per_s
        assert t[0] < t[1] < t[2]


# --- directions from the literature ----------------------------------------------------


def test_decode_is_nearly_flat_in_clock_and_power_drops_a_lot():
    """8B at batch 16 locked to 60% clock: ~4% fewer tokens, ~513 -> ~305 W."""
    full = op(batch=16)
    slow = op(batch=16, clock_cap_mhz=0.6 * H100.max_sm_clock_mhz)
    loss = 1 - slow.decode_tokens_per_s / full.decode_tokens_per_s
    assert 0.01 < loss < 0.08
    assert slow.power_w < 0.7 * full.power_w
    assert slow.power_w == pytest.approx(305, rel=0.1)
    assert not slow.power_capped


@pytest.mark.parametrize("kind", [H100, A100])
def test_prefill_is_proportional_to_clock(kind: physics.GpuKind):
    clocks = np.array([0.5, 0.6, 0.7, 0.8]) * kind.max_sm_clock_mhz
    o = op(kind, batch=64, prefill_fraction=1.0, clock_cap_mhz=clocks)
    relative = o.prefill_tokens_per_s / o.prefill_tokens_per_s[0]
    np.testing.assert_allclose(relative, clocks / clocks[0])
    full = op(kind, batch=64, prefill_fraction=1.0)
    ratio = o.prefill_tokens_per_s / full.prefill_tokens_per_s
    np.testing.assert_allclose(ratio, clocks / kind.max_sm_clock_mhz, rtol=0.03)


def test_decode_power_is_far_below_the_limit_at_small_batch():
    for model in (B8, B70, B405):
        o = op(model=model, batch=np.array([1, 4, 16]))
        assert np.all(o.power_w < 520)
        assert not np.any(o.power_capped)


def test_prefill_reaches_about_the_tdp_at_full_clock():
    assert op(batch=32, prefill_fraction=1.0).power_w == pytest.approx(700, rel=0.02)
    assert op(A100, batch=32, prefill_fraction=1.0).power_w == pytest.approx(400, rel=0.02)


@pytest.mark.parametrize("model", [B8, B70])
def test_a_500_w_cap_costs_decode_little_and_prefill_much(model: physics.ModelProfile):
    """Starting-model prediction: decode ~5%, prefill ~17%."""
    d_full, d_cap = op(model=model, batch=256), op(model=model, batch=256, power_limit_w=500)
    decode_loss = 1 - d_cap.decode_tokens_per_s / d_full.decode_tokens_per_s
    p_full = op(model=model, batch=256, prefill_fraction=1.0)
    p_cap = op(model=model, batch=256, prefill_fraction=1.0, power_limit_w=500)
    prefill_loss = 1 - p_cap.prefill_tokens_per_s / p_full.prefill_tokens_per_s
    assert 0.01 < decode_loss < 0.10
    assert 0.12 < prefill_loss < 0.22
    assert decode_loss < prefill_loss / 2


@pytest.mark.parametrize("model", [B8, B70])
def test_a100_is_slower_and_draws_less(model: physics.ModelProfile):
    batch = np.array([1, 16, 64, 256, 512])
    for pf in (0.0, 0.3, 1.0):
        h = op(H100, model, batch=batch, prefill_fraction=pf)
        a = op(A100, model, batch=batch, prefill_fraction=pf)
        assert np.all(a.tokens_per_s < h.tokens_per_s)
        assert np.all(a.power_w < h.power_w)


def test_a100_times_follow_splitwise_ratios():
    h = op(H100, batch=16, clock_cap_mhz=1500)  # below any power cap on both
    a = op(A100, batch=16, clock_cap_mhz=1500 * 1410 / 1980)
    assert h.decode_tokens_per_s / a.decode_tokens_per_s == pytest.approx(1.47, rel=0.01)
    hp = op(H100, batch=16, prefill_fraction=1.0, clock_cap_mhz=1500)
    ap = op(A100, batch=16, prefill_fraction=1.0, clock_cap_mhz=1500 * 1410 / 1980)
    assert ap.prefill_tokens_per_s / hp.prefill_tokens_per_s == pytest.approx(0.448, rel=0.01)


# --- properties the policies rely on -------------------------------------------------------


@pytest.mark.parametrize(("kind", "model"), KINDS_MODELS, ids=lambda x: x.name)
def test_power_never_exceeds_the_limit_and_more_limit_never_fewer_tokens(kind, model):
    limits = np.linspace(kind.power_min_w, kind.power_max_w, 41)[:, None, None]
    batch = np.array([0, 0.5, 1, 16, 64, 256, 1024])[None, :, None]
    pf = np.array([0.0, 0.15, 0.5, 1.0])[None, None, :]
    o = op(kind, model, batch=batch, prefill_fraction=pf, power_limit_w=limits)
    assert np.all(o.power_w <= limits + 1e-9)
    assert np.all(np.diff(o.tokens_per_s, axis=0) >= -1e-9)
    assert np.all(np.diff(o.power_w, axis=0) >= -1e-9)


@pytest.mark.parametrize(("kind", "model"), KINDS_MODELS, ids=lambda x: x.name)
def test_more_batch_never_lower_throughput(kind, model):
    batch = np.arange(0, 1025, 4.0)[:, None]
    limits = np.array([kind.power_min_w, 0.6 * kind.power_max_w, kind.power_max_w])[None, :]
    for pf in (0.0, 0.2):
        t = op(kind, model, batch=batch, prefill_fraction=pf, power_limit_w=limits).tokens_per_s
        assert np.all(np.diff(t, axis=0) >= -1e-9)


def test_more_clock_never_fewer_tokens_or_less_power():
    clocks = np.array(H100.supported_sm_clocks_mhz()[::-1], dtype=float)[:, None]
    o = op(batch=np.array([1, 16, 256]), prefill_fraction=0.1, clock_cap_mhz=clocks)
    assert np.all(np.diff(o.tokens_per_s, axis=0) >= -1e-9)
    assert np.all(np.diff(o.power_w, axis=0) >= -1e-9)


def test_below_the_knee_decode_slows_much_more():
    f = op(batch=16, clock_cap_mhz=np.array([1980, 1200, 1000, 600, 345])).decode_tokens_per_s
    assert f[1] / f[0] > 0.9  # above the knee: nearly flat
    assert f[4] / f[2] < 0.45  # below it: memory reads stretch with the clock


def test_idle_and_fractional_batch():
    idle = op(batch=0, prefill_fraction=0.5)
    assert idle.power_w == H100.idle_w
    assert idle.decode_tokens_per_s == 0 and idle.prefill_tokens_per_s == 0
    assert math.isinf(idle.tpot_s) and not idle.power_capped
    one = op(batch=1)
    half = op(batch=0.5)
    assert half.decode_tokens_per_s == pytest.approx(one.decode_tokens_per_s / 2)
    assert half.power_w == pytest.approx((one.power_w + H100.idle_w) / 2)
    assert op(batch=1e-9).power_w == pytest.approx(H100.idle_w)
    assert math.isinf(op(batch=8, prefill_fraction=1.0).tpot_s)


def test_power_capped_means_the_limit_sets_the_clock_most_of_the_time():
    """At the default limit prefill (700 W demand) is capped, small-batch decode is not."""
    assert op(batch=64, prefill_fraction=1.0).power_capped
    mostly_decode = op(batch=64, prefill_fraction=0.12)
    assert not mostly_decode.power_capped
    assert mostly_decode.capped_share == pytest.approx(0.12)
    assert op(batch=512, prefill_fraction=0.12).power_capped
    locked = op(batch=512, clock_cap_mhz=1200)
    assert not locked.power_capped and locked.capped_share == 0


def test_tpot_is_batch_over_throughput_and_stretched_by_prefill():
    d = op(batch=64)
    assert d.tpot_s == pytest.approx(64 / d.decode_tokens_per_s)
    m = op(batch=64, prefill_fraction=0.25)
    assert m.tpot_s == pytest.approx(d.tpot_s / 0.75)


def test_vectorised_equals_scalar():
    rng = np.random.default_rng(7)
    n = 50
    batch = rng.uniform(0, 600, n)
    batch[:3] = [0, 0.4, 1]
    pf = rng.uniform(0, 1, n)
    clock = rng.uniform(300, 2100, n)
    clock[5] = np.nan
    limit = rng.uniform(150, 750, n)
    limit[6] = np.nan
    for kind, model in KINDS_MODELS:
        v = op(
            kind, model, batch=batch, prefill_fraction=pf, clock_cap_mhz=clock, power_limit_w=limit
        )
        for i in range(n):
            s = op(
                kind,
                model,
                batch=float(batch[i]),
                prefill_fraction=float(pf[i]),
                clock_cap_mhz=float(clock[i]),
                power_limit_w=float(limit[i]),
            )
            for name in (
                "decode_tokens_per_s",
                "prefill_tokens_per_s",
                "power_w",
                "effective_clock_mhz",
                "tpot_s",
                "power_capped",
                "capped_share",
            ):
                assert getattr(s, name) == pytest.approx(getattr(v, name)[i]), (kind.name, i, name)
            assert np.ndim(s.power_w) == 0


def test_defaults_mean_default_limit_and_no_lock():
    assert op(batch=300).power_w == op(batch=300, power_limit_w=700, clock_cap_mhz=1980).power_w
    nan = op(batch=300, power_limit_w=np.nan, clock_cap_mhz=np.nan)
    assert nan.power_w == op(batch=300).power_w


def test_tensor_parallel_group_runs_at_its_slowest_gpu():
    limits = np.array([[700, 700, 400, 700], [700, 700, 700, 700]])
    g = physics.group_operating_point(H100, B70, batch=256, power_limit_w=limits)
    alone = op(model=B70, batch=256, power_limit_w=limits)
    assert np.all(g.decode_tokens_per_s[0] == g.decode_tokens_per_s[0, 2])
    assert g.decode_tokens_per_s[0, 0] == pytest.approx(alone.decode_tokens_per_s[0, 2])
    assert g.decode_tokens_per_s[1, 0] == pytest.approx(alone.decode_tokens_per_s[1, 0])
    assert np.all(g.power_w[0] <= alone.power_w[0][2] + 1e-9)  # the others slow down too
    assert list(g.power_capped[0]) == [False, False, True, False]
    assert physics.group_clock_fraction([[1.0, 0.7, 0.9]]) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="groups of 4"):
        physics.group_operating_point(H100, B70, batch=np.ones(3))


def test_models_and_kinds():
    assert (B8.tensor_parallel, B70.tensor_parallel, B405.tensor_parallel) == (1, 4, 8)
    assert not B405.supports(A100)
    with pytest.raises(ValueError, match="only on: h100"):
        op(A100, B405)
    assert H100.product_name == "NVIDIA H100 80GB HBM3"
    assert A100.product_name == "NVIDIA A100-SXM4-80GB"
    for kind in (H100, A100):
        clocks = kind.supported_sm_clocks_mhz()
        assert clocks[0] == kind.max_sm_clock_mhz and clocks[-1] == kind.min_sm_clock_mhz
        assert set(np.diff(clocks)) == {-kind.clock_step_mhz}
        assert kind.power_min_w < kind.power_default_w <= kind.power_max_w
    assert (A100.max_sm_clock_mhz, A100.power_max_w) == (1410, 400)


def test_approach_is_an_exact_first_order_lag():
    assert physics.approach(0.0, 10.0, 1.0, 1.0) == pytest.approx(10 * (1 - math.exp(-1)))
    two_halves = physics.approach(physics.approach(0.0, 10.0, 0.5, 0.3), 10.0, 0.5, 0.3)
    assert two_halves == pytest.approx(physics.approach(0.0, 10.0, 1.0, 0.3))
    assert physics.approach(3.0, 10.0, 0.0, 1.0) == 3.0
    assert physics.approach(3.0, 10.0, 0.1, 0.0) == 10.0
    v = physics.approach(np.array([0.0, 5.0]), np.array([10.0, 5.0]), 0.1, np.array([1.0, 2.0]))
    np.testing.assert_allclose(v, [10 * (1 - math.exp(-0.1)), 5.0])
    assert H100.limit_time_constant_s > 10 * H100.clock_time_constant_s


def test_host_power():
    h = physics.HOST_KINDS["dgx-h100"]
    assert h.max_w == pytest.approx(10200 - 8 * 700)
    assert physics.host_power_w(h, 0.0) == h.idle_w
    assert physics.host_power_w(h, 1.0) == h.serving_w
    np.testing.assert_allclose(
        physics.host_power_w(h, np.array([-1, 0.5, 2])),
        [h.idle_w, (h.idle_w + h.serving_w) / 2, h.serving_w],
    )
    a = physics.HOST_KINDS["dgx-a100"]
    assert a.idle_w < a.max_w == pytest.approx(6500 - 8 * 400)


# --- whatif --------------------------------------------------------------------------------


def test_point_decode_prefill_mixed():
    d = whatif.point("h100", "llama-8b", "decode", 16, None, None, None)
    assert d["tokens_per_s"] == pytest.approx(d["decode_tokens_per_s"])
    assert d["tpot_s"] == pytest.approx(16 / d["tokens_per_s"])
    assert d["power_capped"] is False and d["gpu"] == "h100" and d["batch"] == 16
    p = whatif.point("h100", "llama-8b", "prefill", 16, 1200, 500, None)
    assert p["tpot_s"] is None and p["prefill_tokens_per_s"] > 0 and p["decode_tokens_per_s"] == 0
    assert (p["clock_mhz"], p["power_limit_w"]) == (1200, 500)
    m = whatif.point("A100", "llama-70b", "mixed", 64, None, 300, 0.2)
    assert m["tokens_per_s"] == pytest.approx(m["decode_tokens_per_s"] + m["prefill_tokens_per_s"])
    assert m["power_w"] <= 300 and m["tensor_parallel"] == 4
    idle = whatif.point("h100", "llama-8b", "decode", 0, None, None, None)
    assert idle["tpot_s"] is None and idle["joules_per_token"] is None


def _point(gpu="h100", model="llama-8b", phase="decode", batch=1, clock=None, limit=None, pf=None):
    return whatif.point(gpu, model, phase, batch, clock, limit, pf)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu": "v100"}, "unknown gpu 'v100'; known: a100, h100"),
        ({"model": "gpt-5"}, "unknown model 'gpt-5'; known: llama-405b-fp8, llama-70b, llama-8b"),
        ({"phase": "train"}, "unknown phase 'train'"),
        ({"clock": 2100}, "clock 2100 MHz is outside the H100's supported range 345-1980 MHz"),
        ({"clock": 100}, "outside the H100's supported range"),
        ({"limit": 150}, "power limit 150 W is below the H100's minimum of 200 W"),
        ({"gpu": "a100", "limit": 450}, "power limit 450 W is above the A100's maximum of 400 W"),
        ({"batch": -1}, "batch must be >= 0, got -1"),
        ({"phase": "mixed"}, "phase 'mixed' needs prefill_fraction"),
        ({"phase": "mixed", "pf": 1.5}, "prefill_fraction must be within 0..1"),
        ({"pf": 0.5}, "prefill_fraction applies to phase 'mixed' only"),
        ({"gpu": "a100", "model": "llama-405b-fp8"}, "not modelled on a100 (only on: h100)"),
    ],
)
def test_point_rejects_bad_input_clearly(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _point(**kwargs)
