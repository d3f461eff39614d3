import pytest

from specmd.bench.linkemu import achieved_gbps, sleep_cycles, stretch_seconds

MIB12 = 12 * 2**20


def test_stretch_to_a_slower_link():
    # 12 MiB: 0.289 ms at 43.5 GB/s, 0.484 ms at 26 GB/s (the Gen4 profile): stretch by 0.195 ms
    assert stretch_seconds(MIB12, 43.5, 26.0) == pytest.approx(MIB12 / 26e9 - MIB12 / 43.5e9)
    assert stretch_seconds(MIB12, 43.5, 26.0) == pytest.approx(1.947e-4, rel=1e-3)  # 0.195 ms
    assert stretch_seconds(MIB12, 26.0, 43.5) == 0.0  # a faster link than the machine's cannot be emulated
    assert stretch_seconds(MIB12, 26.0, 26.0) == 0.0


def test_emulated_copy_takes_the_target_time():
    native, target = 43.5, 13.0
    total = MIB12 / (native * 1e9) + stretch_seconds(MIB12, native, target)
    assert achieved_gbps(MIB12, total) == pytest.approx(target)


def test_sleep_cycles_and_errors():
    assert sleep_cycles(1e-3, 1.755e9) == 1_755_000
    assert sleep_cycles(0.0, 1e9) == 0
    with pytest.raises(ValueError, match="calibrate"):
        sleep_cycles(1e-3, 0)
    with pytest.raises(ValueError, match="positive"):
        stretch_seconds(1, 0, 1)
    with pytest.raises(ValueError, match="positive"):
        achieved_gbps(1, 0)


def test_calibration_corrects_the_stretch_against_the_measured_rate(monkeypatch):
    """A link whose measured rate drifts (cold first measurement, sleep clock off by 20%) still ends within
    5% of the target."""
    from specmd.bench import timing

    nbytes, cps = 12_582_912, 1.5e9
    calls = []

    def fake_copy_gbps(n, device, cycles=0, **_):
        calls.append(cycles)
        copy_s = n / 45e9  # the warm link
        sleep_s = cycles / (cps * 1.2)  # the sleep runs 20% faster than calibrated
        return n / (copy_s + sleep_s) / 1e9 if len(calls) > 1 else 27.7  # the first (native) read is cold

    monkeypatch.setattr(timing, "copy_gbps", fake_copy_gbps)
    cycles, measured, native = timing.calibrate_link(nbytes, 26.0, None, cps)
    assert native == 27.7 and cycles > 0
    assert abs(measured / 26.0 - 1) <= 0.05
    assert len(calls) > 2  # it did correct


def test_calibration_of_a_link_faster_than_the_machine_does_not_stretch(monkeypatch):
    from specmd.bench import timing

    monkeypatch.setattr(timing, "copy_gbps", lambda n, device, cycles=0, **_: 20.0)
    cycles, measured, _ = timing.calibrate_link(12_582_912, 26.0, None, 1.5e9)
    assert cycles == 0 and measured == 20.0
