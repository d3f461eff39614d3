"""Train a small OLMoE-architecture MoE on the Python standard library's source, with a byte-level BPE
tokenizer trained here, and save it as a Hugging Face checkpoint (bf16 safetensors + tokenizer).

    python benchmarks/train_tiny_moe.py --minutes 30 --out specmd/checkpoints/olmoe-pystdlib

Data: benchmarks/data/python311-stdlib.txt.xz (CPython 3.11.7's library without its tests and
site-packages, 836 files concatenated; files whose path hashes to 0 mod 10 are held out for validation). Loss: next-token
cross-entropy plus OLMoE's load-balancing auxiliary loss (router_aux_loss_coef). Reports validation loss
against a unigram baseline, per-layer expert-load entropy and how well next-layer speculation recalls
the routed experts, into OUT/training_report.json.
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


def batches(ids: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        yield torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, val_ids: torch.Tensor, seq: int, routers, top_k: int, lookahead: int = 3) -> dict:
    """Validation loss, per-layer expert-load entropy (bits) and speculation recall at lookahead 1..3."""
    model.eval()
    captured = {}
    hooks = [layer.mlp.experts.register_forward_pre_hook(
        lambda m, args, i=i: captured.__setitem__(i, (args[0].detach(), args[1].detach())))
        for i, layer in enumerate(model.model.layers)]
    losses, loads = [], torch.zeros(len(routers), routers[0].weight.shape[0])
    hit = torch.zeros(lookahead)
    total = torch.zeros(lookahead)
    for start in range(0, min(len(val_ids) - seq - 1, 64 * seq), seq):
        chunk = val_ids[start:start + seq + 1].unsqueeze(0).to(model.device)
        out = model(chunk[:, :-1], labels=chunk[:, 1:].clone())
        losses.append(out.loss.item() - (model.config.router_aux_loss_coef * out.aux_loss.item()
                                         if out.aux_loss is not None else 0.0))
        for layer, (hidden, index) in captured.items():
            loads[layer] += torch.bincount(index.reshape(-1), minlength=loads.shape[1]).float().cpu()
            for d in range(1, lookahead + 1):
                target = layer + d
                if target >= len(routers):
                    continue
                pred = torch.nn.functional.linear(hidden, routers[target].weight).topk(top_k, -1).indices  # [T, k]
                truth = captured[target][1]  # [T, k]
                hit[d - 1] += (pred.unsqueeze(-1) == truth.unsqueeze(-2)).any(-1).sum().item()
                total[d - 1] += truth.numel()
    for h in hooks:
        h.remove()
    model.train()
    probs = loads / loads.sum(-1, keepdim=True)
    entropy = -(probs * probs.clamp_min(1e-12).log2()).sum(-1)
    return {"val_loss": sum(losses) / len(losses), "load_entropy_bits": entropy.tolist(),
            "max_entropy_bits": math.log2(loads.shape[1]),
            "speculation_recall": {f"d{d + 1}": (hit[d] / total[d]).item() for d in range(lookahead) if total[d]}}


def train(model, train_ids: torch.Tensor, args) -> tuple[int, int, list[dict], float]:
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
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(elapsed, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = batch.to(args.device)
        loss = model(batch[:, :-1], labels=batch[:, 1:].clone()).loss  # includes the aux loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch[:, :-1].numel()
        if step % 50 == 0:
            log.append({"step": step, "tokens": tokens, "loss": loss.item(), "lr": lr,
                        "seconds": time.time() - start})
            print(json.dumps(log[-1]), flush=True)
    return step, tokens, log, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--expert-intermediate", type=int, default=96)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, OlmoeConfig

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_text, val_text = split_corpus(lzma.open(DATA, "rt", encoding="utf-8").read())
    tok = train_tokenizer(train_text, args.vocab, out)
    train_ids = torch.tensor(tok(train_text).input_ids)
    val_ids = torch.tensor(tok(val_text).input_ids)
    counts = torch.bincount(train_ids, minlength=len(tok)).float() + 1
    unigram = -(torch.bincount(val_ids, minlength=len(tok)).float() * (counts / counts.sum()).log()).sum() / len(val_ids)
    config = OlmoeConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.expert_intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         num_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=args.seq,
                         router_aux_loss_coef=0.01, output_router_logits=True, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(args.device)
    routers = [layer.mlp.gate for layer in model.model.layers]
    step, tokens, log, seconds = train(model, train_ids, args)
    report = {"steps": step, "train_tokens": tokens, "seconds": seconds, "device": args.device,
              "unigram_val_loss": unigram.item(), "params": sum(p.numel() for p in model.parameters()),
              **evaluate(model, val_ids, args.seq, routers, args.top_k), "log": log}
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=1))


if __name__ == "__main__":
    main()
