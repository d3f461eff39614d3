"""What a compiled decode step asks of the CUDA runtime, from a torch profiler trace (graph_h100.py --profile
writes one per compiled graph row): per step, the kernels its one CUDA graph launch runs, and the runtime
calls the host makes between two launches (generate's own: input copies, sampling, the stopping check's
one device->host copy and synchronize). No synchronize or device->host copy can sit inside the graph: a
captured graph holds device work only.

    python benchmarks/step_api_calls.py DIR/trace-graph-lru---5---compiled--prompt-16.json[.gz]
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    path = parser.parse_args().trace
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as file:
        events = json.load(file)["traceEvents"]
    runtime = sorted((e for e in events if e.get("cat") == "cuda_runtime"), key=lambda e: e["ts"])
    launches = [e for e in runtime if e["name"] == "cudaGraphLaunch"]
    by_launch = Counter(e["args"]["correlation"] for e in events if e.get("cat") == "kernel")
    print(f"{len(launches)} graph launches (decode steps); kernels in each: "
          f"{sorted({by_launch[e['args']['correlation']] for e in launches})}")
    copies = Counter(e["name"] for e in events if e.get("cat") == "gpu_memcpy" and any(
        a["ts"] <= e["ts"] for a in launches))
    for before, after in zip(launches, launches[1:]):
        between = Counter(e["name"] for e in runtime if before["ts"] < e["ts"] < after["ts"])
        print("host calls between two launches:", dict(between.most_common()))
    print("device copies from the first launch on:", dict(copies))


if __name__ == "__main__":
    main()
