"""Checkpoints read straight into the host store (``specmd/loader.py``): every family in the layouts it is
published in, sharded, gives the tokens of transformers' own load of the same files; the experts are never
twice in host memory; bad checkpoints are refused by name."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import specmd
from specmd.runtime.adapters import SUPPORTED_FAMILIES
from specmd.tiny import tiny_model

IDS = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))


def generate(model):
    return model.generate(IDS.to(model.device), max_new_tokens=8, min_new_tokens=8, do_sample=False).cpu()


def transformers_tokens(folder):
    return generate(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True))


def save_fused(model, folder, shards=1):
    """The model's own tensors (transformers 5's fused experts), split over ``shards`` files with an index."""
    folder.mkdir(exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: state[k] for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("family", sorted(SUPPORTED_FAMILIES))
def test_published_layout_sharded_gives_transformers_tokens(family, tmp_path, device):
    """save_pretrained writes what the family publishes (per-expert tensors under the family's names, or
    fused ones for GPT-OSS and Granite-MoE); a small shard size spreads a layer over several files."""
    tiny_model(family).save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    want = transformers_tokens(tmp_path)
    model = specmd.from_pretrained(tmp_path, "50%", device=device, dtype=torch.float32, progress=False)
    assert torch.equal(generate(model), want)
    report = model.specmd.load_report
    assert report.bytes_read == sum(p.numel() * 4 for p in model.state_dict().values() if p.is_floating_point()
                                    ) - _tied_bytes(model)
    model.specmd.close()


def _tied_bytes(model):
    tied = model.config.tie_word_embeddings and model.get_output_embeddings() is not None
    return model.get_output_embeddings().weight.numel() * 4 if tied else 0


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_fused_layout_in_several_files(family, tmp_path, device):
    source = tiny_model(family)
    save_fused(source, tmp_path, shards=3)
    model = specmd.from_pretrained(tmp_path, "25%", device=device, dtype=torch.float32, progress=False)
    assert torch.equal(generate(model), generate(source))
    model.specmd.close()


def test_the_checkpoint_dtype_is_kept_unless_asked(tmp_path):
    tiny_model("olmoe", dtype=torch.bfloat16).save_pretrained(tmp_path)
    model = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    assert model.specmd.store.layer(0).dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    model = specmd.from_pretrained(tmp_path, "50%", device="cpu", dtype="float32", progress=False)
    assert model.specmd.store.layer(0).dtype == torch.float32


def _refused(folder, match):
    with pytest.raises(ValueError, match=match):
        specmd.from_pretrained(folder, "50%", device="cpu", progress=False)


def test_bad_checkpoints_are_refused_by_name(tmp_path):
    source = tiny_model("olmoe")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}

    def folder(name, tensors, config=None):
        path = tmp_path / name
        path.mkdir()
        (config or source.config).save_pretrained(path)
        save_file(tensors, path / "model.safetensors")
        return path

    experts = "model.layers.1.mlp.experts.down_proj"
    _refused(folder("missing", {k: v for k, v in state.items() if k != experts}), "experts are missing")
    _refused(folder("no-norm", {k: v for k, v in state.items() if k != "model.norm.weight"}),
             "1 weights are not in the checkpoint")
    _refused(folder("int8", {**state, experts: state[experts].to(torch.int8)}), "I8; specmd reads float")
    bigger = tiny_model("olmoe", intermediate_size=64).config
    _refused(folder("shape", state, bigger), "has shape .* where the config gives")
    truncated = folder("truncated", state)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) - 100])
    _refused(truncated, "truncated")


def test_the_experts_are_never_twice_in_host_memory(tmp_path):
    """A checkpoint of 768 MiB of experts, loaded in a fresh process: its peak resident memory grows by the
    store and a little more, never by a second copy (transformers' load, then a copy into the store, would
    hold both)."""
    model = tiny_model("olmoe", hidden_size=256, intermediate_size=512, num_experts=64, num_hidden_layers=8)
    model.save_pretrained(tmp_path, max_shard_size="64MB")
    expert_bytes = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in
                       (layer.mlp.experts for layer in model.model.layers)) * 4
    del model
    script = textwrap.dedent(f"""
        import torch, specmd
        from specmd.loader import host_peak_bytes
        from specmd.tiny import tiny_model
        tiny_model("olmoe")  # imports and first allocations before the baseline
        before = host_peak_bytes()
        model = specmd.from_pretrained({str(tmp_path)!r}, "10%", device="cpu", progress=False)
        print(before, host_peak_bytes(), model.specmd.store.total_bytes)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before, after, store = map(int, out.split()[-3:])
    assert store >= expert_bytes
    growth = after - before
    assert growth < store + 0.25 * expert_bytes, (growth, store)  # a second copy would add expert_bytes


def test_run_prints_what_the_load_cost(capsys):
    from specmd.cli import main

    assert main(["run", "--model", str(specmd.shipped_model_path()), "--new-tokens", "2", "--device", "cpu"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("checkpoint: "))
    assert "GiB in" in line and "GB/s" in line and "host peak" in line


def test_a_host_too_small_is_refused_before_anything_is_allocated(tmp_path, monkeypatch, capsys):
    tiny_model("olmoe").save_pretrained(tmp_path)
    monkeypatch.setattr(specmd.api, "host_memory_available", lambda: 1000)
    with pytest.raises(MemoryError, match="GiB of host memory and 0.0 GiB are available"):
        specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    from specmd.cli import main

    assert main(["run", "--model", str(tmp_path), "--device", "cpu"]) == 2
    assert "host memory" in capsys.readouterr().err


def test_pinning_that_fails_falls_back_to_pageable_memory_with_one_warning(tmp_path, monkeypatch, caplog):
    tiny_model("olmoe").save_pretrained(tmp_path)
    want = transformers_tokens(tmp_path)
    empty = torch.empty

    def no_pinning(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("cudaHostAlloc: out of memory (as a locked-memory limit would answer)")
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_pinning)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # so the store asks for pinned memory
    with caplog.at_level("WARNING"):
        model = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    warnings = [r for r in caplog.records if "pinning" in r.getMessage()]
    assert len(warnings) == 1 and "ulimit -l" in warnings[0].getMessage()
    assert not model.specmd.store.pin and not model.specmd.store.layer(0).is_pinned()
    monkeypatch.undo()
    assert torch.equal(generate(model), want)


def test_the_load_never_makes_the_expert_views_contiguous(tmp_path, monkeypatch):
    """state_dict() makes each strided expert view contiguous (a copy of every expert at once: on a CUDA host,
    where the pinned store is resident, twice the experts); the load must never call it."""
    from specmd.runtime import store

    tiny_model("olmoe").save_pretrained(tmp_path)
    calls = []
    real = store._contiguous_experts
    monkeypatch.setattr(store, "_contiguous_experts", lambda *a: calls.append(1) or real(*a))
    specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    assert not calls
