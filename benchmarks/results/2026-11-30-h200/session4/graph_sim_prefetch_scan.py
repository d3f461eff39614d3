import sys, json
from specmd.study.costmodel import GraphLink, ModelTiming
from specmd.study.graph_sim import GraphTiming, simulate_graph
from specmd.study.trace import load_trace
trace = load_trace("benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz")
tm = GraphTiming(GraphLink.load("h200-graph-measured"), ModelTiming("olmoe", 12582912, 4.6 / 16, 0.0099))
ev = sys.argv[1]
for b in (5, 10, 20):
    for pf, d, k in (("none", 1, None), ("topk", 1, 2), ("topk", 1, 4), ("topk", 1, 6), ("topk", 1, 8), ("topk", 2, 4), ("topk", 2, 8)):
        s = simulate_graph(trace, int(1024 * b / 100), ev, pf, d, k=k, warm=True, timing=tm)
        t = s.total
        print(json.dumps(dict(ev=ev, b=b, pf=pf, d=d, k=k, hit=round(s.hit_rate, 3), copies=t.misses + t.prefetches, tpot=round(s.estimated_tpot_ms, 2))), flush=True)
