"""Speculative routing: the prediction policies, their metrics and the presets."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import specmd
from specmd.runtime.prefetch import Predictor, PrefetchConfig
from specmd.tiny import tiny_model


def router_with_probs(probs):
    """A router whose logits for the input [[1, 0, ...]] are log(probs), so softmax gives probs."""
    router = nn.Linear(len(probs), len(probs), bias=False)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor(probs).log()
    return router


PROBS = [0.05, 0.4, 0.3, 0.15, 0.06, 0.04]
X = torch.eye(6)[:1]  # one token: [1, 0, 0, 0, 0, 0]


def predict(policy, **kw):
    routers = [router_with_probs(PROBS)] * 4
    return Predictor(PrefetchConfig(policy=policy, **kw), routers, top_k=2).predict(0, X)


def test_topk_defaults_to_the_models_top_k():
    assert predict("topk").tolist() == [[1, 2]]
    assert predict("topk", k=3).tolist() == [[1, 2, 3]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    # cap defaults to 2 * top_k = 4 candidates: 0.4, 0.3, 0.15, 0.06
    assert predict("top-p", p=0.5).tolist() == [[1, 2, -1, -1]]  # 0.4 < 0.5, 0.7 reaches it
    assert predict("top-p", p=0.8).tolist() == [[1, 2, 3, -1]]
    assert predict("top-p", p=0.99, cap=3).tolist() == [[1, 2, 3]]


def test_threshold_keeps_scores_above_tau():
    assert predict("threshold", tau=0.1).tolist() == [[1, 2, 3, -1]]


def test_lookahead_predicts_cyclic_layers_nearest_first():
    routers = [router_with_probs(PROBS) for _ in range(4)]
    p = Predictor(PrefetchConfig(policy="topk", lookahead=3), routers, top_k=2)
    assert p.targets(0) == [1, 2, 3]
    assert p.targets(3) == [0, 1, 2]  # the last layer predicts the next pass's first layers
    assert p.predict(3, X).shape == (3, 2)
    assert Predictor(PrefetchConfig(), routers, 2).predict(0, X) is None


@pytest.mark.parametrize("bias", [False, True])
def test_batched_routers_predict_what_each_router_predicts(bias):
    """One product over the looked-ahead routers (and the one-token top-k shortcut) picks, per layer,
    the experts that layer's own router ranks best by mean probability."""
    torch.manual_seed(0)
    routers = [nn.Linear(16, 8, bias=bias) for _ in range(4)]
    for tokens in (1, 5):
        x = torch.randn(tokens, 16)
        for policy in ("topk", "top-p"):
            p = Predictor(PrefetchConfig(policy=policy, lookahead=3, p=0.999), routers, top_k=3)
            got = p.predict(1, x)
            want = torch.stack([r(x).softmax(-1).mean(0).topk(p.candidates).indices for r in routers[2:] + routers[:1]])
            assert got.tolist() == want.tolist(), (tokens, policy)


@pytest.mark.parametrize("kw, match", [
    (dict(policy="oracle"), "topk"), (dict(lookahead=4), "lookahead"), (dict(p=0.0), "p="),
    (dict(k=0), "k="), (dict(tau=1.5), "tau"), (dict(max_inflight=0), "max_inflight"),
])
def test_bad_prefetch_config(kw, match):
    with pytest.raises(ValueError, match=match):
        PrefetchConfig(**kw)


def test_unknown_prefetch_name_through_the_api():
    with pytest.raises(ValueError, match="threshold"):
        specmd.offload(tiny_model("olmoe"), "50%", prefetch="psychic", device="cpu")


def test_prediction_metrics_equal_a_recount_from_the_recorded_trace(device):
    """Precision and recall count exactly what the recorder saw: for each layer call, the nearest
    prediction's top-k candidates against the experts the layer then routed to."""
    model = specmd.offload(tiny_model("olmoe"), "50%", "least-stale", device, prefetch="topk")
    recorder = model.specmd.record_routing(lookahead=1)
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(3)).to(device)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    model.specmd.close()
    stats = model.specmd.stats()  # the snapshot taken at close
    calls = [layer for p in recorder.passes for layer in p["layers"]]  # in execution order
    want = [[0, 0, 0] for _ in stats.layers]  # per layer: predicted, correct, accesses
    for before, (i, call) in zip(calls, enumerate(calls[1:], start=1)):
        layer = i % len(stats.layers)
        predicted, routed = set(before["predicted"][0][:2]), set(call["ids"])
        want[layer] = [want[layer][0] + len(predicted), want[layer][1] + len(predicted & routed),
                       want[layer][2] + len(routed)]
    assert [[s.predicted, s.predicted_correct, s.predicted_accesses] for s in stats.layers] == want
    total = stats.total
    assert total.prefetches > 0 and total.prefetch_bytes == total.prefetches * stats.expert_bytes
    assert total.precision == sum(w[1] for w in want) / sum(w[0] for w in want)
    assert stats.to_dict()["total"]["recall"] == total.recall == sum(w[1] for w in want) / sum(w[2] for w in want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="in-flight copies exist only on CUDA")
def test_prefetch_copies_in_flight_are_bounded():
    ref = tiny_model("olmoe").cuda()
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(3)).cuda()
    want = ref.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    model = specmd.offload(tiny_model("olmoe"), "50%", "lru", "cuda",
                           prefetch=PrefetchConfig("topk", lookahead=2, max_inflight=2))
    with model.specmd:  # closed at the end: later tests count live watchdog threads
        assert torch.equal(model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False), want)
        stats = model.specmd.stats()  # waits for the watchdog's last requests
        assert stats.total.prefetches > 0
        assert 1 <= stats.peak_inflight_prefetches <= 2


def test_presets_load_by_name(device):
    model = specmd.offload(tiny_model("olmoe"), "25%", device=device, preset="least-stale-top-p")
    config = model.specmd.config
    assert config.eviction == "least-stale" and config.prefetch.policy == "top-p" and config.prefetch.p == 0.9
    model.specmd.close()
    model = specmd.offload(tiny_model("olmoe"), "25%", "lru", device, preset="least-stale-topk")
    assert model.specmd.config.eviction == "lru"  # an explicit argument wins over the preset
    model.specmd.close()
    with pytest.raises(ValueError, match="lru-topk"):
        specmd.offload(tiny_model("olmoe"), "25%", preset="no-such-preset")


def test_cli_runs_a_preset():
    out = subprocess.run([sys.executable, "-m", "specmd.cli", "run", "--preset", "lru-topk", "--new-tokens", "8",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "prefetch: hits=" in out.stdout and "eviction: lru  prefetch: topk" in out.stdout


def test_batched_routers_follow_weights_written_in_place():
    torch.manual_seed(0)
    routers = [nn.Linear(16, 8, bias=False) for _ in range(3)]
    p = Predictor(PrefetchConfig(policy="topk", lookahead=2), routers, top_k=2)
    x = torch.randn(1, 16)
    p.predict(0, x)
    with torch.no_grad():
        routers[2].weight.zero_()
        routers[2].weight[5, 0] = 100.0  # layer 2 now always prefers expert 5
    assert p.predict(0, x.abs())[1, 0].item() == 5
    with torch.inference_mode():  # cached products made under inference_mode stay usable with autograd on
        p.predict(1, x)
    x.requires_grad_(True)
    p.predict(1, x)
