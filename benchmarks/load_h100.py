"""Loading a real-size checkpoint straight into the pinned store (issue 13), on the GPU machine.

Writes an OLMoE-1B-7B-shaped checkpoint (random bf16 weights, about 13 GB) in the published per-expert
layout (``model.layers.N.mlp.experts.E.gate_proj.weight`` ...), one shard per decoder layer, then, each in a
fresh process (so peak resident memory is that step's alone):
  1. the time to read the files, cold (pages dropped with posix_fadvise) and warm, on one thread and on as
     many threads as the loader uses (``loader.READ_THREADS``, 64 MiB pieces of the files);
  2. ``specmd.from_pretrained(DIR, "5%")``, cold and warm: its wall time and load report (time by stage,
     bytes, resident memory before the load and at its peak: VmHWM, the process's own since exec), the
     store's size and whether every store buffer is pinned. transformers and specmd are imported and CUDA
     initialised before the timer starts: a library import is not load time;
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
import queue
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


def read_parallel_seconds(folder: Path, threads: int, piece: int = 64 * 2**20) -> float:
    """Seconds to read every file of ``folder`` on ``threads`` threads, each taking ``piece``-byte ranges of
    the files in turn through its own file handle (plain reads, as the loader makes them)."""
    from concurrent.futures import ThreadPoolExecutor

    ranges = [(file, start) for file in sorted(folder.iterdir()) for start in range(0, file.stat().st_size, piece)]
    buffers = queue.SimpleQueue()  # one per thread, made before the timer as read_seconds' one is
    for _ in range(threads):
        buffers.put(bytearray(piece))

    def read(file: Path, start: int) -> None:
        buffer = buffers.get()
        with open(file, "rb", buffering=0) as handle:
            handle.seek(start)
            handle.readinto(buffer)
        buffers.put(buffer)

    begin = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda r: read(*r), ranges))
    return time.perf_counter() - begin


def in_fresh_process(step: str, args) -> dict:
    """Run ``step`` of this script in a new Python process; its JSON line back."""
    command = [sys.executable, __file__, "--step", step, "--dir", str(args.dir), "--device", args.device,
               "--out", str(args.out), "--model", args.model, "--budget", args.budget]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_specmd(args) -> dict:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import specmd

    # Before the timer: a library import is not load time. transformers imports a model's module on first
    # use (0.8 s for the tiny OLMoE on the CPU machine, inside the skeleton stage otherwise); CUDA's context too.
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(args.dir, local_files_only=True))]
    if args.device == "cuda":
        torch.zeros(1, device="cuda")
    start = time.perf_counter()
    model = specmd.from_pretrained(args.dir, args.budget, device=args.device, dtype=torch.bfloat16, progress=False)
    wall = time.perf_counter() - start
    report = model.specmd.load_report
    store = model.specmd.store
    ids = torch.tensor(PROMPT, device=model.device)
    tokens = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0].tolist()
    return {"wall_s": wall, "report_s": report.seconds, "stages_s": dict(report.stages),
            "read_threads": report.read_threads,
            "register_busy_s": store.pin_seconds, "bytes_read": report.bytes_read,
            "host_peak_bytes": report.host_peak_bytes, "host_before_bytes": report.host_before_bytes,
            "store_bytes": store.total_bytes, "pinned": store.pin,
            "all_buffers_pinned": all(store.layer(i).is_pinned() for i in range(store.num_layers)), "tokens": tokens}


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
    from specmd.loader import READ_THREADS

    threads = READ_THREADS
    drop_pages(args.dir)
    result["read_cold_s"] = read_seconds(args.dir)
    result["read_warm_s"] = read_seconds(args.dir)
    drop_pages(args.dir)
    result["read_par_cold_s"] = read_parallel_seconds(args.dir, threads)
    result["read_par_warm_s"] = read_parallel_seconds(args.dir, threads)
    result["read_threads"] = threads
    drop_pages(args.dir)
    result["specmd_cold"] = in_fresh_process("specmd", args)
    result["specmd_warm"] = in_fresh_process("specmd", args)
    (args.out / "sizes.json").write_text(json.dumps({"store_bytes": result["specmd_warm"]["store_bytes"]}))
    result["transformers"] = in_fresh_process("transformers", args)
    if args.device == "cuda":
        result["pinning"] = in_fresh_process("pinning", args)
    (args.out / "load.json").write_text(json.dumps(result, indent=1))
    print_table(result, args)


def print_table(result: dict, args) -> None:
    """The table: reads and loads, cold and warm; ``x read``: load time over the one-thread read (the
    acceptance ratio, issue 13: at most 1.5), ``x par``: over the parallel read of as many threads."""
    gb = result["file_bytes"] / 1e9
    threads = result["read_threads"]
    print(f"checkpoint: {gb:.2f} GB in {len(list(args.dir.glob('*.safetensors')))} files")
    print(f"{'':<22}{'seconds':>9}{'GB/s':>7}{'x read':>8}{'x par':>7}{'RSS before GiB':>16}{'peak RSS GiB':>14}"
          f"{'store GiB':>11}")
    for name in ("cold", "warm"):
        read, par = result[f"read_{name}_s"], result[f"read_par_{name}_s"]
        load = result[f"specmd_{name}"]
        print(f"{'read ' + name + ', 1 thread':<22}{read:>9.2f}{gb / read:>7.2f}")
        print(f"{f'read {name}, {threads} threads':<22}{par:>9.2f}{gb / par:>7.2f}")
        print(f"{'specmd ' + name:<22}{load['wall_s']:>9.2f}{gb / load['wall_s']:>7.2f}{load['wall_s'] / read:>8.2f}"
              f"{load['wall_s'] / par:>7.2f}{load['host_before_bytes'] / 2**30:>16.2f}"
              f"{load['host_peak_bytes'] / 2**30:>14.2f}{load['store_bytes'] / 2**30:>11.2f}")
    for name in ("cold", "warm"):
        load = result[f"specmd_{name}"]
        stages = ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in load["stages_s"].items())
        print(f"specmd {name} stages (s): {stages}; registering busy {load['register_busy_s']:.2f} "
              f"(overlapped with the read but for 'pin'); {load['read_threads']} readers; store pinned: "
              f"{'all buffers' if load['all_buffers_pinned'] else 'NO' if load['pinned'] else 'no (pageable)'}")
    same = result["specmd_warm"]["tokens"] == result["transformers"]["tokens"]
    print(f"tokens identical to transformers' full-{args.device} load: {'yes' if same else 'NO'}")
    if "pinning" in result:
        print("pinning: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in result["pinning"].items()))

if __name__ == "__main__":
    main()
