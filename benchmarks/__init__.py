"""Benchmarks of deepercluster against the bare libraries it wraps: ``python -m benchmarks [--quick] [--slurm]``.

Each benchmark runs the package's own stage function and a bare baseline (faiss, torch,
numpy) side by side in the same run, on the same inputs, and prints their ratio against a
goal; ``docs/scale.md`` predicts the paper's scale from the throughputs it prints.
"""
