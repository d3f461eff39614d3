"""The checkpoint shipped in the package loads with plain transformers and with specmd, identically."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import specmd
from specmd.shipped import SHIPPED_MODEL, shipped_model_path

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").exists(), reason="no shipped checkpoint")


def test_shipped_checkpoint_meets_its_spec():
    path = shipped_model_path()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 20 * 10**6
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "olmoe" and config["num_experts"] >= 32 and config["num_experts_per_tok"] >= 4
    report = json.loads((path / "training_report.json").read_text())
    assert report["val_loss"] < report["unigram_val_loss"]


def test_specmd_generates_what_transformers_generates(device):
    path = shipped_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = tokenizer("def parse_args(argv):\n    ", return_tensors="pt").input_ids.to(device)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).to(device)
    want = plain.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    for eviction, prefetch in (("lru", "none"), ("least-stale", "topk")):
        model = specmd.from_pretrained(path, "10%", eviction, device, dtype=torch.float32, prefetch=prefetch,
                                       progress=False)
        assert torch.equal(model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False), want)
        model.specmd.close()
