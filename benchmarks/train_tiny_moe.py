"""Train a small MoE on the Python standard library's source, with a byte-level BPE tokenizer trained
here, and save it as a Hugging Face checkpoint (bf16 safetensors + tokenizer).

    python benchmarks/train_tiny_moe.py --minutes 30 --out specmd/checkpoints/olmoe-pystdlib
    python benchmarks/train_tiny_moe.py --model qwen3-30b-a3b --hidden 64 --expert-intermediate 16 \
        --minutes 6 --out /tmp/qwen3-tiny

Without ``--model`` it builds an OLMoE-architecture model of the sizes given (``--layers``, ``--experts``,
``--top-k``). With ``--model NAME`` (a file of configs/models/) it builds that model's own family and
topology: the real number of layers, routed experts, top-k, shared experts and dense layers, with only
the widths shrunk (hidden size, heads, intermediate sizes scaled together, vocabulary from the tokenizer).

Data: benchmarks/data/python311-stdlib.txt.xz (CPython 3.11.7's library without its tests and
site-packages, 836 files concatenated; files whose path hashes to 0 mod 10 are held out for validation).
Loss: next-token cross-entropy plus the family's load-balancing auxiliary loss at the real model's
coefficient (``AUX_COEF``). Reports validation loss against a unigram baseline, per-layer expert-load
entropy, token-to-token expert reuse and how well next-layer speculation recalls the routed experts,
into OUT/training_report.json.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import time
import zlib
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data" / "python311-stdlib.txt.xz"

# configs/models name -> the load-balancing loss coefficient of the published checkpoint's config.json
# (router_aux_loss_coef; DeepSeek-V2-Lite's aux_loss_alpha). transformers' config classes default to
# 0.001 for all of them, which is not Mixtral's or GPT-OSS's value.
AUX_COEF = {"olmoe-1b-7b-0924": 0.01, "qwen1.5-moe-a2.7b": 0.001, "qwen3-30b-a3b": 0.001,
            "deepseek-v2-lite": 0.001, "mixtral-8x7b": 0.02, "gpt-oss-20b": 0.9}


def split_corpus(text: str) -> tuple[str, str]:
    train, val = [], []
    for chunk in text.split("\n# ==== ")[1:]:
        name = chunk.split(" ====", 1)[0]
        (val if zlib.crc32(name.encode()) % 10 == 0 else train).append(chunk)
    return "\n".join(train), "\n".join(val)


def train_tokenizer(text: str, vocab_size: int, out: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], vocab_size=vocab_size,
                            min_frequency=2, special_tokens=["<|endoftext|>", "<|pad|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.save_pretrained(out)
    return tok


def olmoe_config(args, tok):
    """The original path: an OLMoE-architecture model of the sizes on the command line."""
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.expert_intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                       num_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=args.seq,
                       router_aux_loss_coef=0.01, output_router_logits=True, tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def shrunk_config(name: str, args, tok):
    """``name``'s real config (configs/models/) with its widths shrunk: hidden ``args.hidden``, ``args.heads``
    heads (key/value heads in the real ratio, at least one), the routed expert's intermediate size
    ``args.expert_intermediate`` and every other intermediate size (dense layers, shared experts) scaled by
    the same factor. Layers, experts, top-k, shared-expert count and dense layers stay as they are."""
    from specmd.runtime.adapters import family_config
    from specmd.study.costmodel import ModelSpec

    spec = ModelSpec.load(name)
    real = spec.transformers_config().to_dict()
    heads = args.heads
    if args.hidden % heads:
        raise ValueError(f"--hidden {args.hidden} must be a multiple of --heads {heads}")
    # OLMoE, Mixtral and GPT-OSS name the expert's width intermediate_size; the others have a dense one too
    expert_key = "moe_intermediate_size" if "moe_intermediate_size" in spec.config else "intermediate_size"
    scale = args.expert_intermediate / real[expert_key]
    kv = max(1, heads * real["num_key_value_heads"] // real["num_attention_heads"])
    config = dict(spec.config, vocab_size=len(tok), hidden_size=args.hidden, num_attention_heads=heads,
                  num_key_value_heads=kv,
                  output_router_logits=True, router_aux_loss_coef=AUX_COEF.get(name, real.get("router_aux_loss_coef")),
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in spec.config:
            config[key] = max(1, round(spec.config[key] * scale))
    config[expert_key] = args.expert_intermediate
    if "head_dim" in spec.config:
        config["head_dim"] = args.hidden // heads
    if spec.family == "deepseek_v2":
        # multi-head latent attention: every head and latent width shrunk by the hidden size's factor
        shrink = args.hidden / real["hidden_size"]
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            config[key] = max(8, round(real[key] * shrink / 8) * 8)
        config["head_dim"] = config["qk_rope_head_dim"]
    made = family_config(spec.family, **config)
    if spec.family == "gpt_oss":
        made._attn_implementation = "eager"  # sliding-window attention with sinks runs in eager only
    return made


def moe_modules(model) -> tuple[list, list]:
    """(experts modules, routers) of the model's MoE layers in order, as specmd finds them."""
    from specmd.runtime.adapters import find_moe_layers

    layers = find_moe_layers(model)
    return [layer.module for layer in layers], [layer.router for layer in layers]


def model_loss(model, batch: torch.Tensor, aux_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to train on, next-token loss alone). The family's own aux loss when its model adds one; else
    (DeepSeek-V2 in transformers) the same Switch-style balance loss from the recorded router logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    out = model(batch[:, :-1], labels=batch[:, 1:].clone())
    config = model.config
    if getattr(out, "aux_loss", None) is not None:
        return out.loss, out.loss - config.router_aux_loss_coef * out.aux_loss
    if aux_coef and getattr(out, "router_logits", None):
        aux = load_balancing_loss_func(out.router_logits, out.router_logits[0].shape[-1],
                                       config.num_experts_per_tok)
        return out.loss + aux_coef * aux, out.loss
    return out.loss, out.loss


def batches(ids: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        yield torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, val_ids: torch.Tensor, seq: int, experts, routers, top_k: int, aux_coef: float = 0.0,
             lookahead: int = 3, chunks: int = 64) -> dict:
    """Validation loss, per-layer expert-load entropy (bits), token-to-token expert reuse (per layer, the
    fraction of token t's routed experts also routed at t-1) and speculation recall at lookahead 1..3
    (the routed top-k found among the top-k that layer l's router input gives through layer l+d's router)."""
    model.eval()
    captured = {}
    hooks = [module.register_forward_pre_hook(
        lambda m, args, i=i: captured.__setitem__(i, (args[0].detach(), args[1].detach())))
        for i, module in enumerate(experts)]
    n = len(routers)
    losses, loads = [], torch.zeros(n, routers[0].weight.shape[0])
    reused, pairs = torch.zeros(n), torch.zeros(n)
    hit = torch.zeros(lookahead)
    total = torch.zeros(lookahead)
    for start in range(0, min(len(val_ids) - seq - 1, chunks * seq), seq):
        chunk = val_ids[start:start + seq + 1].unsqueeze(0).to(model.device)
        losses.append(model_loss(model, chunk, aux_coef)[1].item())
        for layer, (hidden, index) in captured.items():
            index = index.reshape(-1, top_k)  # [T, k]
            loads[layer] += torch.bincount(index.reshape(-1), minlength=loads.shape[1]).float().cpu()
            reused[layer] += (index[1:].unsqueeze(-1) == index[:-1].unsqueeze(-2)).any(-1).sum().item()
            pairs[layer] += index[1:].numel()
            for d in range(1, lookahead + 1):
                target = layer + d
                if target >= n:
                    continue
                router = routers[target]
                logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), router.weight,
                                                    getattr(router, "bias", None))
                pred = logits.topk(top_k, -1).indices  # [T, k]
                truth = captured[target][1].reshape(-1, top_k)  # [T, k]
                hit[d - 1] += (pred.unsqueeze(-1) == truth.unsqueeze(-2)).any(-1).sum().item()
                total[d - 1] += truth.numel()
    for h in hooks:
        h.remove()
    model.train()
    probs = loads / loads.sum(-1, keepdim=True)
    entropy = -(probs * probs.clamp_min(1e-12).log2()).sum(-1)
    return {"val_loss": sum(losses) / len(losses), "load_entropy_bits": entropy.tolist(),
            "max_entropy_bits": math.log2(loads.shape[1]), "token_reuse": (reused / pairs).tolist(),
            "speculation_recall": {f"d{d + 1}": (hit[d] / total[d]).item() for d in range(lookahead) if total[d]}}


def train(model, train_ids: torch.Tensor, args, aux_coef: float) -> tuple[int, int, list[dict], float]:
    """AdamW with warm-up and cosine decay until ``args.minutes`` run out: (steps, tokens, log, seconds)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    deadline = time.time() + args.minutes * 60
    log, step, tokens = [], 0, 0
    start = time.time()
    for batch in batches(train_ids, args.seq, args.batch, gen):
        elapsed = (time.time() - start) / (args.minutes * 60)
        if time.time() > deadline:
            break
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(elapsed, 1.0)))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * cosine
        for group in opt.param_groups:
            group["lr"] = lr
        batch = batch.to(args.device)
        loss, _ = model_loss(model, batch, aux_coef)  # includes the aux loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch[:, :-1].numel()
        if step % args.log_every == 0:
            log.append({"step": step, "tokens": tokens, "loss": loss.item(), "lr": lr,
                        "seconds": time.time() - start})
            print(json.dumps(log[-1]), flush=True)
    return step, tokens, log, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None,
                        help="a configs/models name: its family and topology with shrunk widths (default: OLMoE "
                             "of --layers/--experts/--top-k)")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4, help="attention heads (--model)")
    parser.add_argument("--layers", type=int, default=4, help="MoE layers (without --model)")
    parser.add_argument("--experts", type=int, default=32, help="experts per layer (without --model)")
    parser.add_argument("--top-k", type=int, default=4, help="experts per token (without --model)")
    parser.add_argument("--expert-intermediate", type=int, default=96)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-chunks", type=int, default=64, help="validation chunks of --seq tokens")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_text, val_text = split_corpus(lzma.open(DATA, "rt", encoding="utf-8").read())
    tok = train_tokenizer(train_text, args.vocab, out)
    train_ids = torch.tensor(tok(train_text).input_ids)
    val_ids = torch.tensor(tok(val_text).input_ids)
    counts = torch.bincount(train_ids, minlength=len(tok)).float() + 1
    val_counts = torch.bincount(val_ids, minlength=len(tok)).float()
    unigram = -(val_counts * (counts / counts.sum()).log()).sum() / len(val_ids)
    config = shrunk_config(args.model, args, tok) if args.model else olmoe_config(args, tok)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(args.device)
    experts, routers = moe_modules(model)
    # the family's own aux loss is in the model's loss when it has one; model_loss adds it otherwise
    aux_coef = config.router_aux_loss_coef if hasattr(config, "router_aux_loss_coef") else AUX_COEF.get(args.model, 0.0)
    step, tokens, log, seconds = train(model, train_ids, args, aux_coef)
    report = {"model": args.model or "olmoe", "family": config.model_type, "command": vars(args),
              "moe_layers": len(experts), "num_experts": routers[0].weight.shape[0],
              "top_k": config.num_experts_per_tok, "aux_loss_coef": aux_coef,
              "steps": step, "train_tokens": tokens, "seconds": seconds, "device": args.device,
              "threads": torch.get_num_threads(), "unigram_val_loss": unigram.item(),
              "params": sum(p.numel() for p in model.parameters()),
              **evaluate(model, val_ids, args.seq, experts, routers, config.num_experts_per_tok, aux_coef,
                         chunks=args.eval_chunks),
              "log": log}
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out)
    config.to_json_file(out / "train_config.json")
    (out / "training_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=1))


if __name__ == "__main__":
    main()
