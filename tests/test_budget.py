import pytest

from specmd.config import Budget, OffloadConfig


@pytest.mark.parametrize("spec, kind, value", [
    (600_000_000, "bytes", 600_000_000),
    ("600MB", "bytes", 600_000_000),
    ("0.6GB", "bytes", 600_000_000),
    ("1.5GiB", "bytes", 1.5 * 2**30),
    ("512 KiB", "bytes", 512 * 1024),
    ("1000", "bytes", 1000),
    ("5%", "fraction", 0.05),
    (0.05, "fraction", 0.05),
    (1.0, "fraction", 1.0),
    ("auto", "auto", 0.0),
])
def test_budget_forms(spec, kind, value):
    budget = Budget.parse(spec)
    assert budget.kind == kind and budget.value == pytest.approx(value)


@pytest.mark.parametrize("spec", ["lots", "5 parsecs", "-3MB", "0%", "120%", 0, -5, 1.5, 0.0, True, None, [1]])
def test_bad_budget_names_the_accepted_forms(spec):
    with pytest.raises(ValueError, match="expert_budget"):
        Budget.parse(spec)


def test_resolve():
    assert Budget.parse("25%").resolve(1000) == 250
    assert Budget.parse(123).resolve(1000) == 123
    free, total = 40 * 2**30, 80 * 2**30
    assert Budget.parse("auto").resolve(1000, free, total) == free - 8 * 2**30  # 10% of 80 GiB > 2 GiB
    with pytest.raises(ValueError, match="CUDA"):
        Budget.parse("auto").resolve(1000)


def test_config_from_yaml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("expert_budget: 5%\neviction: lru\n")
    cfg = OffloadConfig.from_yaml(path)
    assert cfg.eviction == "lru" and cfg.expert_budget == Budget("fraction", 0.05)
    path.write_text("expert_budget: 5%\neviction_policy: lru\n")
    with pytest.raises(ValueError, match="eviction_policy"):
        OffloadConfig.from_yaml(path)
