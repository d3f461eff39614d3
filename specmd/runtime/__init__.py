"""The runtime, in the order data flows: adapters (model knowledge) -> store (pinned host experts) ->
copier and cache (device slots, eviction policy) -> prefetch -> engines (main loop, watchdog) -> metrics."""
