"""Checkpoints read straight into the host store (``specmd/loader.py``): every family in the layouts it is
published in, sharded, gives the tokens of transformers' own load of the same files; the experts are never
twice in host memory; bad checkpoints are refused by name."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

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
        from specmd.load_report import host_peak_bytes
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
    from specmd.runtime import pinning

    tiny_model("olmoe").save_pretrained(tmp_path)
    want = transformers_tokens(tmp_path)
    cudart = FakeCudart(fail_after=1)  # the first layer is pinned, the second fails (as a locked-memory limit would)
    monkeypatch.setattr(pinning, "_cuda_runtime", lambda: (cudart, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # so the store asks for pinned memory
    with caplog.at_level("WARNING"):
        model = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    warnings = [r for r in caplog.records if "pinning" in r.getMessage()]
    assert len(warnings) == 1 and "ulimit -l" in warnings[0].getMessage()
    assert "out of memory" in warnings[0].getMessage()
    assert not model.specmd.store.pin
    assert [call[0] for call in cudart.calls] == ["register", "register"]  # nothing asked after the failure
    monkeypatch.undo()
    assert torch.equal(generate(model), want)


def test_a_store_without_a_cuda_runtime_stays_pageable_with_one_warning(tmp_path, monkeypatch, caplog):
    from specmd.runtime import pinning

    def no_runtime():
        raise RuntimeError("CUDA driver initialization failed")

    tiny_model("olmoe").save_pretrained(tmp_path)
    monkeypatch.setattr(pinning, "_cuda_runtime", no_runtime)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level("WARNING"):
        model = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    warnings = [r.getMessage() for r in caplog.records if "pinning" in r.getMessage()]
    assert len(warnings) == 1 and "CUDA driver initialization failed" in warnings[0]
    assert not model.specmd.store.pin


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


class FakeCudart:
    """torch.cuda.cudart() as far as the store's pinning uses it: records each call, and whether the memory was
    still mapped when it was unregistered. Succeeds ``fail_after`` times, then answers out of memory."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = []
        self.fail_after = fail_after

    def cudaHostRegister(self, address, size, flags):
        self.calls.append(("register", address, size))
        registered = sum(call[0] == "register" for call in self.calls)
        return 2 if self.fail_after is not None and registered > self.fail_after else 0

    def cudaHostUnregister(self, address):
        self.calls.append(("unregister", address, _mapped(address)))
        return 0

    def cudaGetErrorString(self, code):
        return "out of memory"


def _mapped(address):
    """Whether ``address`` lies in a mapping of this process (Linux); None elsewhere."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    return any(int(lo, 16) <= address < int(hi, 16) for lo, hi in (line.split()[0].split("-") for line in maps))


def test_the_store_is_registered_layer_by_layer_and_unregistered_before_it_is_freed(tmp_path, monkeypatch):
    """The bookkeeping of pinning in place, with the CUDA runtime faked: each layer's buffer registered once,
    whole, at its own address; unregistered when the model is gone, while its memory is still mapped."""
    import gc

    from specmd.runtime import pinning

    tiny_model("olmoe").save_pretrained(tmp_path, max_shard_size="100KB")
    want = transformers_tokens(tmp_path)
    cudart = FakeCudart()
    monkeypatch.setattr(pinning, "_cuda_runtime", lambda: (cudart, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    store = model.specmd.store
    buffers = [(store.layer(i).data_ptr(), store.layer(i).numel() * store.layer(i).element_size())
               for i in range(store.num_layers)]
    assert store.pin and sorted(call[1:] for call in cudart.calls) == sorted(buffers)
    assert all(address % 4096 == 0 for address, _ in buffers)  # page-aligned mappings
    monkeypatch.undo()
    assert torch.equal(generate(model), want)
    model.specmd.close()
    del model, store
    gc.collect()
    unregistered = [call for call in cudart.calls if call[0] == "unregister"]
    assert sorted(call[1] for call in unregistered) == sorted(address for address, _ in buffers)
    if _mapped(buffers[0][0]) is not None:
        assert all(call[2] for call in unregistered)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning in place needs CUDA (the CPU tests fake it)")
def test_the_store_is_pinned_in_place_on_cuda(tmp_path):
    tiny_model("olmoe").save_pretrained(tmp_path)
    model = specmd.from_pretrained(tmp_path, "50%", device="cuda", progress=False)
    store = model.specmd.store
    assert store.pin and all(store.layer(i).is_pinned() for i in range(store.num_layers))
    model.specmd.close()


def test_a_readers_error_is_raised_as_itself(tmp_path, monkeypatch):
    """A shard that shrinks after the checks, before it is read: the reader thread's ValueError reaches the
    caller as itself, and no reader or pinning thread is left running."""
    import threading

    from specmd import loader

    tiny_model("olmoe").save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    plan = loader._plan

    def plan_then_truncate(*args):
        planned = plan(*args)
        shard.write_bytes(shard.read_bytes()[:-100])
        return planned

    monkeypatch.setattr(loader, "_plan", plan_then_truncate)
    with pytest.raises(ValueError, match="ends inside a tensor; the file is truncated"):
        specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith(("specmd-read", "specmd-pin"))]


def test_the_report_times_the_stages_and_the_host_memory(tmp_path):
    from specmd.load_report import host_peak_bytes, host_resident_bytes

    tiny_model("olmoe").save_pretrained(tmp_path)
    report = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False).specmd.load_report
    assert list(report.stages) == ["skeleton", "allocate", "place", "read", "pin", "engine"]
    assert report.seconds == pytest.approx(sum(report.stages.values()))
    assert 0 < report.host_before_bytes <= report.host_peak_bytes <= host_peak_bytes()
    assert host_peak_bytes() >= host_resident_bytes() > 0
    assert "\n" not in report.summary() and "read " in report.summary()


def test_the_host_peak_is_the_processs_own():
    """A child's peak does not include the memory its parent held (ru_maxrss carries it across exec on Linux)."""
    from specmd.load_report import host_peak_bytes

    if sys.platform != "linux":
        pytest.skip("the peak since exec is Linux's VmHWM")
    held = torch.ones(2**30, dtype=torch.uint8)  # 1 GiB, every page touched
    script = "from specmd.load_report import host_peak_bytes; print(host_peak_bytes())"
    child = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert host_peak_bytes() > held.numel() > child


def test_offload_and_from_config_pin_each_layer_before_writing_it(monkeypatch):
    """offload copies each layer's experts into a registered buffer, from_config draws them into one (a copy
    from the device into pinned memory runs at link speed); outputs as without pinning."""
    from specmd.runtime import pinning
    from specmd.tiny import tiny_config

    source = tiny_model("olmoe")
    want = generate(source)
    cudart = FakeCudart()
    monkeypatch.setattr(pinning, "_cuda_runtime", lambda: (cudart, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = specmd.offload(source, "50%", device="cpu")
    assert model.specmd.store.pin and len(cudart.calls) == model.specmd.store.num_layers
    assert torch.equal(generate(model), want)
    built = specmd.from_config(tiny_config("olmoe"), "50%", device="cpu", dtype=torch.float32, seed=1)
    assert built.specmd.store.pin and len(cudart.calls) == 2 * built.specmd.store.num_layers
    monkeypatch.undo()
    unpinned = specmd.from_config(tiny_config("olmoe"), "50%", device="cpu", dtype=torch.float32, seed=1)
    assert unpinned.specmd.store.pin == torch.cuda.is_available()  # the real CUDA runtime decides again
    assert torch.equal(generate(built), generate(unpinned))
