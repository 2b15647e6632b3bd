"""Worker side: distributed context, the training loop, optimizers, perf counters."""
