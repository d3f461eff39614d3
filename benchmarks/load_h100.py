"""Loading a real-size checkpoint straight into the pinned store (issue 13), on the GPU machine.

Writes an OLMoE-1B-7B-shaped checkpoint (random bf16 weights, about 13 GB) in the published per-expert
layout (``model.layers.N.mlp.experts.E.gate_proj.weight`` ...), one shard per decoder layer, then, each in a
fresh process (so peak resident memory is that step's alone):
  1. the time to read the files, cold (pages dropped with posix_fadvise) and warm;
  2. ``specmd.from_pretrained(DIR, "5%")``, cold and warm: its load report (read time, bytes, host peak RSS)
     and the store's size;
  3. tokens: transformers' full-GPU load of the same files against specmd's at 5% (16 greedy tokens).
Also the pinning choices for a store of the same size: per-layer ``pin_memory`` buffers, one buffer, and
pageable memory registered with cudaHostRegister.

    python benchmarks/load_h100.py --dir /tmp/olmoe-ckpt --out OUT     # prints a table last, OUT/load.json
    python benchmarks/load_h100.py --model tiny --device cpu --budget 50% ...  # the same steps, tiny model, CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT = [[5, 100, 200, 31, 7, 90, 44, 12]]  # inside every vocabulary, the tiny one too


def write_checkpoint(folder: Path, model: str) -> int:
    """The per-expert checkpoint of ``model`` ("olmoe-1b-7b-0924" or "tiny") in ``folder``; returns its bytes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from specmd.runtime.adapters import find_moe_layers
    from specmd.study.costmodel import ModelSpec
    from specmd.tiny import tiny_config

    config = tiny_config("olmoe") if model == "tiny" else ModelSpec.load(model).transformers_config()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    experts = {id(p) for layer in find_moe_layers(skeleton) for p in layer.module.parameters()}
    generator = torch.Generator().manual_seed(0)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in skeleton.state_dict(keep_vars=True).items():
        parts = name.split(".")
        shard = f"layer-{parts[2]}" if parts[:2] == ["model", "layers"] else "rest"
        if id(param) not in experts:
            shards.setdefault(shard, {})[name] = _random(param.shape, generator)
            continue
        prefix, fused = name.rsplit(".", 1)
        for e in range(param.shape[0]):  # [E, 2I, H] -> gate and up [I, H] each; [E, H, I] -> down [H, I]
            if fused == "gate_up_proj":
                half = param.shape[1] // 2
                shards[shard][f"{prefix}.{e}.gate_proj.weight"] = _random((half, param.shape[2]), generator)
                shards[shard][f"{prefix}.{e}.up_proj.weight"] = _random((half, param.shape[2]), generator)
            else:
                shards[shard][f"{prefix}.{e}.down_proj.weight"] = _random(param.shape[1:], generator)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    weight_map, total = {}, 0
    for shard, tensors in shards.items():
        file = f"model-{shard}.safetensors"
        save_file(tensors, folder / file)
        weight_map.update({k: file for k in tensors})
        total += (folder / file).stat().st_size
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def _random(shape, generator) -> torch.Tensor:
    return (torch.randn(tuple(shape), generator=generator) * 0.02).to(torch.bfloat16)


def drop_pages(folder: Path) -> None:
    """Evict the checkpoint's pages from the page cache (clean pages: no root needed)."""
    for file in folder.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_seconds(folder: Path) -> float:
    """Seconds to read every file of ``folder`` with plain 64 MiB reads."""
    buffer = bytearray(64 * 2**20)
    start = time.perf_counter()
    for file in sorted(folder.iterdir()):
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - start


def in_fresh_process(step: str, args) -> dict:
    """Run ``step`` of this script in a new Python process; its JSON line back."""
    command = [sys.executable, __file__, "--step", step, "--dir", str(args.dir), "--device", args.device,
               "--out", str(args.out), "--model", args.model, "--budget", args.budget]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_specmd(args) -> dict:
    import specmd
    from specmd.loader import host_peak_bytes

    before = host_peak_bytes()
    start = time.perf_counter()
    model = specmd.from_pretrained(args.dir, args.budget, device=args.device, dtype=torch.bfloat16, progress=False)
    wall = time.perf_counter() - start
    report = model.specmd.load_report
    ids = torch.tensor(PROMPT, device=model.device)
    tokens = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0].tolist()
    return {"wall_s": wall, "read_s": report.seconds, "bytes_read": report.bytes_read,
            "host_peak_bytes": report.host_peak_bytes, "host_peak_before_bytes": before,
            "store_bytes": model.specmd.store.total_bytes, "pinned": model.specmd.store.pin, "tokens": tokens}


def step_transformers(args) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16, device_map=args.device,
                                                 local_files_only=True)
    model.set_experts_implementation("grouped_mm")  # transformers' default kernels, as specmd mirrors
    ids = torch.tensor(PROMPT, device=model.device)
    return {"tokens": model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0].tolist()}


def step_pinning(args) -> dict:
    """Seconds to get a pinned store of the checkpoint's expert size three ways."""
    from specmd.runtime.store import HostStore  # noqa: F401 (the store's own way is the per-layer one)

    size = int(json.loads((args.out / "sizes.json").read_text())["store_bytes"])
    layers = 16
    out = {}
    start = time.perf_counter()
    per_layer = [torch.empty(size // layers, dtype=torch.uint8, pin_memory=True) for _ in range(layers)]
    out["per_layer_pin_memory_s"] = time.perf_counter() - start
    del per_layer
    start = time.perf_counter()
    one = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    out["one_pin_memory_s"] = time.perf_counter() - start
    del one
    start = time.perf_counter()
    pageable = torch.empty(size, dtype=torch.uint8)
    pageable[::4096] = 0  # touch every page, as a read into it would
    touched = time.perf_counter() - start
    result = torch.cuda.cudart().cudaHostRegister(pageable.data_ptr(), size, 0)
    out["register_s"] = time.perf_counter() - start
    out["register_touch_s"] = touched
    out["register_ok"] = int(result) == 0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="olmoe-1b-7b-0924")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", default="5%")
    parser.add_argument("--step", choices=["specmd", "transformers", "pinning"])
    args = parser.parse_args()
    if args.step:
        print(json.dumps({"specmd": step_specmd, "transformers": step_transformers,
                          "pinning": step_pinning}[args.step](args)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    file_bytes = write_checkpoint(args.dir, args.model)
    result = {"file_bytes": file_bytes, "write_s": time.perf_counter() - start}
    drop_pages(args.dir)
    result["read_cold_s"] = read_seconds(args.dir)
    result["read_warm_s"] = read_seconds(args.dir)
    drop_pages(args.dir)
    result["specmd_cold"] = in_fresh_process("specmd", args)
    result["specmd_warm"] = in_fresh_process("specmd", args)
    (args.out / "sizes.json").write_text(json.dumps({"store_bytes": result["specmd_warm"]["store_bytes"]}))
    result["transformers"] = in_fresh_process("transformers", args)
    if args.device == "cuda":
        result["pinning"] = in_fresh_process("pinning", args)
    (args.out / "load.json").write_text(json.dumps(result, indent=1))
    gb = file_bytes / 1e9
    print(f"checkpoint: {gb:.2f} GB in {len(list(args.dir.glob('*.safetensors')))} files")
    print(f"{'':<16}{'seconds':>9}{'GB/s':>7}{'x read':>8}{'peak RSS GiB':>14}{'store GiB':>11}")
    for name in ("cold", "warm"):
        read = result[f"read_{name}_s"]
        load = result[f"specmd_{name}"]
        print(f"{'read ' + name:<16}{read:>9.1f}{gb / read:>7.2f}")
        print(f"{'specmd ' + name:<16}{load['wall_s']:>9.1f}{gb / load['wall_s']:>7.2f}{load['wall_s'] / read:>8.2f}"
              f"{load['host_peak_bytes'] / 2**30:>14.2f}{load['store_bytes'] / 2**30:>11.2f}")
    same = result["specmd_warm"]["tokens"] == result["transformers"]["tokens"]
    print(f"tokens identical to transformers' full-{args.device} load: {'yes' if same else 'NO'}")
    if "pinning" in result:
        print("pinning: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in result["pinning"].items()))


if __name__ == "__main__":
    main()
