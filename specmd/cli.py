"""Command line: ``specmd run`` generates text through specmd and prints the cache statistics."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# The model of `make run` until a trained checkpoint ships: a tiny OLMoE whose 256-token vocabulary
# is read as bytes, so text goes in and (random-weight) text comes out without a tokenizer download.
RUN_MODEL = dict(family="olmoe", num_hidden_layers=4, num_experts=32, num_experts_per_tok=4, hidden_size=128,
                 intermediate_size=64)


def _load_preset(path: str | None):
    from .config import OffloadConfig

    if path is None:
        return None
    candidate = Path(path)
    if not candidate.exists():
        candidate = CONFIGS / "policies" / f"{path}.yaml"
    if not candidate.exists():
        names = sorted(p.stem for p in (CONFIGS / "policies").glob("*.yaml"))
        raise SystemExit(f"specmd: no preset {path!r}; pass a YAML path or one of: {', '.join(names)}")
    return OffloadConfig.from_yaml(candidate)


def cmd_run(args: argparse.Namespace) -> int:
    import specmd
    from specmd.tiny import tiny_model

    preset = _load_preset(args.preset)
    budget = args.budget or (preset.expert_budget if preset else "25%")
    eviction = args.eviction or (preset.eviction if preset else "least-stale")
    device = args.device or (preset.device if preset else None)
    if args.model:
        model = specmd.from_pretrained(args.model, budget, eviction, device, dtype=args.dtype)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        encode, decode = (lambda s: tokenizer(s, return_tensors="pt").input_ids), tokenizer.decode
    else:
        kwargs = {k: v for k, v in RUN_MODEL.items() if k != "family"}
        model = specmd.offload(tiny_model(RUN_MODEL["family"], **kwargs), budget, eviction, device)
        encode = lambda s: torch.tensor([list(s.encode("utf-8"))])  # noqa: E731
        decode = lambda ids: bytes(int(i) for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    ids = encode(args.prompt).to(model.device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    stats = model.specmd.stats()
    print(f"device: {model.device}  eviction: {eviction}  budget: {budget}  slots: {stats.num_slots}")
    print(f"prompt: {args.prompt!r}")
    print(f"output: {decode(out[0, ids.shape[1]:])!r}")
    print(f"{args.new_tokens} tokens in {seconds:.2f} s (wall clock)")
    print(stats.summary())
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats.to_dict(), indent=1))
    model.specmd.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specmd", description="Expert offloading for Hugging Face MoE models")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate text through specmd and print the cache statistics")
    run.add_argument("--model", help="local checkpoint directory (default: a tiny OLMoE built from a config)")
    run.add_argument("--preset", help="policy preset: a name in configs/policies/ or a YAML path")
    run.add_argument("--budget", help="expert budget: bytes, '600MB', '5%%', 0.05 or 'auto'")
    run.add_argument("--eviction", help="eviction policy")
    run.add_argument("--device", help="cuda, cpu (default: CUDA when available)")
    run.add_argument("--dtype", default=None, help="dtype for --model, e.g. bfloat16")
    run.add_argument("--prompt", default="def fibonacci(n):")
    run.add_argument("--new-tokens", type=int, default=32)
    run.add_argument("--stats-json", help="also write the statistics here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return cmd_run(args)
    except (ValueError, RuntimeError) as err:
        print(f"specmd: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
