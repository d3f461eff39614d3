"""specmd.from_config: a model built straight into place (non-expert weights on the device, experts in
the host store), never whole anywhere, that generates what the same weights do unpatched."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import specmd
from specmd.runtime.adapters import find_moe_layers
from specmd.tiny import tiny_config


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "gpt_oss", "deepseek_v2"])
def test_built_in_place_generates_what_its_weights_do_unpatched(family, device):
    config = tiny_config(family)
    model = specmd.from_config(config, "25%", "lru", device, dtype=torch.float32, prefetch="topk", seed=3)
    assert getattr(config, "_experts_implementation", None) != "specmd"  # the caller's config is not touched
    layers = find_moe_layers(model)
    experts = {id(p) for layer in layers for p in layer.module.parameters()}
    assert all(p.device.type == "cpu" for layer in layers for p in layer.module.parameters())
    assert all(p.device.type == torch.device(device).type for p in model.parameters() if id(p) not in experts)
    assert model.specmd.store.total_bytes == layers[0].layout.layer_bytes * len(layers)
    weights = {k: v.float().std().item() for k, v in model.state_dict().items() if "experts" in k and "bias" not in k}
    assert all(0.01 < std < 0.03 for std in weights.values()), weights  # initialised, not left empty

    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    reference.to(device)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    want = reference.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with model.specmd:
        assert torch.equal(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False), want)


def test_seed_decides_the_weights(device):
    config = tiny_config("olmoe")
    a, b, c = (specmd.from_config(config, "50%", device=device, dtype=torch.float32, seed=s) for s in (1, 1, 2))
    wa, wb, wc = (m.state_dict()["model.layers.0.mlp.experts.down_proj"] for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    for m in (a, b, c):
        m.specmd.close()


def test_bad_arguments_fail_before_anything_is_built():
    with pytest.raises(ValueError, match="unknown eviction"):
        specmd.from_config(tiny_config("olmoe"), "25%", eviction="nope")


def test_transformers_does_not_draw_the_experts_again(monkeypatch):
    """The experts are filled once, by the store (drawn on the device); transformers' initialisation, which
    would draw them on the CPU, skips them."""
    from specmd.runtime.store import HostStore

    monkeypatch.setattr(HostStore, "fill_random", lambda self, layer, std, device: self._buffers[layer.index].fill_(7.0))
    model = specmd.from_config(tiny_config("olmoe"), "50%", device="cpu", dtype=torch.float32)
    with model.specmd:
        assert all(torch.all(v == 7.0) for k, v in model.state_dict().items() if ".experts." in k)
