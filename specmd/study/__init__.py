"""Studying expert caching without a GPU: routing traces (recorded live, replayed into a model) and the
trace-driven simulator with its cost model, driving the runtime's own cache and policies."""
