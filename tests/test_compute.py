"""Expert compute kernels: a slot pool wider than one grouped call allows is covered by several calls."""
import torch

from specmd.runtime import compute


def test_grouped_calls_over_windows_of_slots_match_one_call(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(8, 32, 16, generator=gen).to(torch.bfloat16)  # [S, out, in]
    groups, rows = [], 0
    for slot, count in [(0, 3), (2, 5), (3, 1), (6, 4), (7, 2)]:
        groups.append((slot, rows, rows + count))
        rows += count
    x = torch.randn(rows, 16, generator=gen).to(torch.bfloat16)
    slots = torch.tensor([slot for slot, start, end in groups for _ in range(end - start)])
    whole = compute.grouped_calls(groups, 8, x.device)
    assert len(whole) == 1
    want = compute.project(x, weights, None, slots, groups, whole, False, False)
    monkeypatch.setattr(compute, "GROUPED_MM_MAX_GROUPS", 3)
    windows = compute.grouped_calls(groups, 8, x.device)
    assert [(c.first_slot, c.end_slot, c.first_row, c.end_row) for c in windows] == [
        (0, 3, 0, 8), (3, 6, 8, 9), (6, 8, 9, 15)]
    got = compute.project(x, weights, None, slots, groups, windows, False, False)
    assert torch.equal(got, want)
    loop = compute.project(x, weights, None, slots, groups, None, False, False)
    torch.testing.assert_close(got, loop)
