"""Offline tools: the task suite, training, evaluation and the benchmarks. Serving never imports these."""
