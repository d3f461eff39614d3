"""Engines: what runs each MoE layer of an offloaded model. ``threaded`` is the paper's design (a synchronous
main loop on the model's thread, a prefetch loop, a watchdog thread issuing copies); every engine shares the
store, the slot cache, the policies, the metrics and the main loop's schedule (``mainloop``)."""
