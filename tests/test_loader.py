"""Checkpoints read straight into the host store (``specmd/loader.py``): every family in the layouts it is
published in, sharded, gives the tokens of transformers' own load of the same files; the experts are never
twice in host memory; bad checkpoints are refused by name."""
import ctypes
import gc
import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import specmd
from specmd import loader
from specmd.runtime import pinning
from specmd.runtime.adapters import SUPPORTED_FAMILIES
from specmd.runtime.store import HostStore
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


def test_a_damaged_header_is_refused_with_the_files_name(tmp_path):
    """The loader's own header parsing (check_checkpoint's safetensors check comes first in from_pretrained,
    but the loader does not rely on it): bytes that are not the header's JSON, and a header length beyond the
    file (which would otherwise be allocated), are refused naming the file, not as a bare UnicodeDecodeError
    or MemoryError."""
    tiny_model("olmoe").save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["  # not UTF-8, not JSON
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors: the header is damaged \(UnicodeDecodeError.*"
                                         "copy the checkpoint again"):
        loader.checkpoint_dtype(tmp_path)
    shard.write_bytes((2**62).to_bytes(8, "little") + bytes(data[8:]))
    with pytest.raises(ValueError, match=r"model.safetensors: the header is damaged \(it gives a header of "
                                         r"4611686018427387904 bytes in a file of \d+\)"):
        loader.checkpoint_dtype(tmp_path)


def test_an_expert_twice_is_refused_even_where_the_totals_match(tmp_path):
    """One expert's tensor in two files and another's in none: the element totals match, so only the claimed
    parts show it; read, two readers would write the same bytes and the missing expert would stay garbage."""
    source = tiny_model("olmoe")
    source.save_pretrained(tmp_path / "good")
    state = load_file(tmp_path / "good" / "model.safetensors")
    twice, missing = "model.layers.0.mlp.experts.1.down_proj.weight", "model.layers.0.mlp.experts.2.down_proj.weight"
    assert twice in state and missing in state  # the published per-expert names
    folder = tmp_path / "damaged"
    folder.mkdir()
    source.config.save_pretrained(folder)
    first = {k: v for k, v in state.items() if k != missing}
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": {twice: state[twice]}}
    for name, tensors in files.items():
        save_file(tensors, folder / name)
    weight_map = {k: name for name, tensors in files.items() for k in tensors}  # the index names the last
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _refused(folder, rf"{twice} appears twice \(model-00001-of-00002.safetensors, model-00002-of-00002.safetensors\): "
             "the checkpoint is damaged; copy it again")


def test_many_small_pieces_on_four_readers_give_transformers_tokens(tmp_path, monkeypatch):
    """Pieces of 4 KiB: each of the four readers takes many, the layers' buffers fill out of order and the
    report gives the readers used."""
    tiny_model("olmoe").save_pretrained(tmp_path, max_shard_size="100KB")
    want = transformers_tokens(tmp_path)
    monkeypatch.setattr(loader, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(loader, "READ_THREADS", 4)
    model = specmd.from_pretrained(tmp_path, "50%", device="cpu", dtype=torch.float32, progress=False)
    assert model.specmd.load_report.read_threads == 4
    assert torch.equal(generate(model), want)


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


def fake_pinning(monkeypatch, cudart, device=torch.device("cuda", 0)):
    """Pin the store as for a CUDA ``device`` through ``cudart`` while the model runs on the CPU (no GPU
    needed): the store is built for ``device``, the CUDA runtime is the fake."""
    monkeypatch.setattr(pinning, "_cuda_runtime", cudart.runtime)
    monkeypatch.setattr(specmd.api, "HostStore", lambda target: HostStore(device))


def pin_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "pinning" in r.getMessage()]


def test_pinning_that_fails_falls_back_to_pageable_memory_with_one_warning(tmp_path, monkeypatch, caplog):
    tiny_model("olmoe").save_pretrained(tmp_path)
    want = transformers_tokens(tmp_path)
    cudart = FakeCudart(fail_after=1)  # the first layer is pinned, the second fails (as a locked-memory limit would)
    fake_pinning(monkeypatch, cudart)
    with caplog.at_level("WARNING"):
        model = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    warnings = pin_warnings(caplog)
    assert len(warnings) == 1 and "ulimit -l" in warnings[0] and "out of memory" in warnings[0]
    assert not model.specmd.store.pin
    registered = [call for call in cudart.calls if call[0] == "register"]
    assert len(registered) == 2 and len(cudart.calls) == 2  # nothing asked after the failure
    monkeypatch.undo()
    assert torch.equal(generate(model), want)
    model.specmd.close()
    del model
    gc.collect()
    unregistered = [call[1] for call in cudart.calls if call[0] == "unregister"]
    assert unregistered == [registered[0][1]]  # the pinned buffer once, the failed one never


def test_an_error_on_the_pinning_thread_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    """An exception from cudaHostRegister (not an error code) must not be lost on the pinning thread: the store
    says it is not pinned, the load goes on, the tokens are right."""
    tiny_model("olmoe").save_pretrained(tmp_path)
    want = transformers_tokens(tmp_path)
    cudart = FakeCudart(error=RuntimeError("the driver went away"))
    fake_pinning(monkeypatch, cudart)
    with caplog.at_level("WARNING"):
        model = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    warnings = pin_warnings(caplog)
    assert len(warnings) == 1 and "RuntimeError: the driver went away" in warnings[0]
    assert not model.specmd.store.pin
    monkeypatch.undo()
    assert torch.equal(generate(model), want)


def test_a_store_without_a_cuda_runtime_stays_pageable_with_one_warning(tmp_path, monkeypatch, caplog):
    class NoRuntime(FakeCudart):
        def runtime(self, device):
            raise RuntimeError("CUDA driver initialization failed")

    tiny_model("olmoe").save_pretrained(tmp_path)
    fake_pinning(monkeypatch, NoRuntime())
    with caplog.at_level("WARNING"):
        model = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    warnings = pin_warnings(caplog)
    assert len(warnings) == 1 and "CUDA driver initialization failed" in warnings[0]
    assert "CUDA could not start" in warnings[0] and "ulimit" not in warnings[0]  # the fix for this cause
    assert not model.specmd.store.pin


def test_pinning_registers_on_the_target_device_from_its_own_thread(tmp_path, monkeypatch):
    """The readers submit the buffers, but CUDA starts on the loading thread and the pinning thread selects
    the store's device itself (a reader thread's current device is always 0)."""
    tiny_model("olmoe").save_pretrained(tmp_path, max_shard_size="100KB")
    cudart = FakeCudart()
    fake_pinning(monkeypatch, cudart, torch.device("cuda", 1))
    model = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    assert model.specmd.store.pin
    assert cudart.started == [(torch.device("cuda", 1), threading.main_thread().name)]
    assert [device for device, _ in cudart.selected] == [torch.device("cuda", 1)]
    assert cudart.selected[0][1].startswith("specmd-pin")
    assert {thread for _, thread in cudart.registered_on} == {cudart.selected[0][1]}


def test_a_cpu_model_pins_nothing_even_with_cuda_available(tmp_path, monkeypatch):
    """Pinned memory serves copies to a GPU: a model on the CPU registers nothing, whatever CUDA is present."""
    from specmd.tiny import tiny_config

    tiny_model("olmoe").save_pretrained(tmp_path)
    cudart = FakeCudart()
    monkeypatch.setattr(pinning, "_cuda_runtime", cudart.runtime)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    models = [specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False),
              specmd.offload(tiny_model("olmoe"), "50%", device="cpu"),
              specmd.from_config(tiny_config("olmoe"), "50%", device="cpu", dtype=torch.float32)]
    assert not any(model.specmd.store.pin for model in models)
    assert not cudart.started and not cudart.calls


def test_a_failed_unregister_clears_the_error_and_a_forked_child_leaves_it_alone(caplog):
    import os

    class FailingUnregister(FakeCudart):
        def cudaHostUnregister(self, address):
            self.calls.append(("unregister", address))
            return 4

    cudart = FailingUnregister()
    with caplog.at_level("WARNING"):
        pinning._unregister(cudart, 4096, None, os.getpid())
    assert cudart.calls == [("unregister", 4096), ("get_last_error",)]
    assert "cudaHostUnregister" in caplog.text
    pinning._unregister(cudart, 8192, None, os.getpid() + 1)  # the parent's registration: not this process's
    assert len(cudart.calls) == 2


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
    still mapped when it was unregistered, and hashes the bytes at registration. Succeeds ``fail_after`` times,
    then answers out of memory; raises ``error`` from cudaHostRegister where given."""

    def __init__(self, fail_after: int | None = None, error: Exception | None = None) -> None:
        self.calls = []
        self.fail_after = fail_after
        self.error = error
        self.started = []  # (device, thread) of each start of the runtime
        self.selected = []  # (device, thread) of each selection of the device
        self.registered_on = []  # (address, thread) of each registration
        self.hashes = {}  # address -> sha256 of its bytes when it was registered

    def runtime(self, device):
        """pinning._cuda_runtime's stand-in."""
        self.started.append((device, threading.current_thread().name))
        return self, lambda: self.selected.append((device, threading.current_thread().name))

    def cudaHostRegister(self, address, size, flags):
        self.calls.append(("register", address, size))
        self.registered_on.append((address, threading.current_thread().name))
        if self.error is not None:
            raise self.error
        registered = sum(call[0] == "register" for call in self.calls)
        if self.fail_after is not None and registered > self.fail_after:
            return 2
        self.hashes[address] = hashlib.sha256(ctypes.string_at(address, size)).hexdigest()
        return 0

    def cudaHostUnregister(self, address):
        self.calls.append(("unregister", address, _mapped(address)))
        return 0

    def cudaGetErrorString(self, code):
        return "out of memory"

    def cudaGetLastError(self):
        self.calls.append(("get_last_error",))
        return 0


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
    tiny_model("olmoe").save_pretrained(tmp_path, max_shard_size="100KB")
    want = transformers_tokens(tmp_path)
    cudart = FakeCudart()
    fake_pinning(monkeypatch, cudart)
    model = specmd.from_pretrained(tmp_path, "50%", device="cpu", progress=False)
    store = model.specmd.store
    buffers = [(store.layer(i).data_ptr(), store.layer(i).numel() * store.layer(i).element_size())
               for i in range(store.num_layers)]
    assert store.pin and sorted(call[1:] for call in cudart.calls) == sorted(buffers)
    assert all(address % 4096 == 0 for address, _ in buffers)  # page-aligned mappings
    # registered only once complete: the bytes at registration are the final ones
    assert cudart.hashes == {address: hashlib.sha256(ctypes.string_at(address, size)).hexdigest()
                             for address, size in buffers}
    monkeypatch.undo()
    assert torch.equal(generate(model), want)
    model.specmd.close()
    del model, store
    gc.collect()
    unregistered = [call for call in cudart.calls if call[0] == "unregister"]
    assert sorted(call[1] for call in unregistered) == sorted(address for address, _ in buffers)  # each once
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
    assert [name for name, _ in report.stages] == ["skeleton", "allocate", "place", "read", "pin", "engine"]
    assert report.seconds == pytest.approx(sum(seconds for _, seconds in report.stages))
    assert hash(report) == hash(report)  # frozen and hashable: the stages are a tuple
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
    from specmd.tiny import tiny_config

    source = tiny_model("olmoe")
    want = generate(source)
    cudart = FakeCudart()
    fake_pinning(monkeypatch, cudart)
    model = specmd.offload(source, "50%", device="cpu")
    assert model.specmd.store.pin and len(cudart.calls) == model.specmd.store.num_layers
    assert torch.equal(generate(model), want)
    built = specmd.from_config(tiny_config("olmoe"), "50%", device="cpu", dtype=torch.float32, seed=1)
    assert built.specmd.store.pin and len(cudart.calls) == 2 * built.specmd.store.num_layers
    monkeypatch.undo()
    unpinned = specmd.from_config(tiny_config("olmoe"), "50%", device="cpu", dtype=torch.float32, seed=1)
    assert not unpinned.specmd.store.pin  # a CPU model: plain memory
    assert torch.equal(generate(built), generate(unpinned))
