"""``specmd bench``: the benchmark matrix's configuration, its GPU runner, timing and link emulation, the
machine record and the reports."""
