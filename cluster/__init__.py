"""The service around the engine: Ray Serve wiring (``serve``), the HTTP API (``api/``), the dashboard, KubeRay,
the private redis-server, the CLI (``cli``) and the benchmarks (``bench/``).
Imports go one way, kernels <- actors <- cluster: this package may import both rooms below it; they never
import it (tests/test_layout.py fails on one that does)."""
