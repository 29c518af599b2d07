"""`onspec bench ...`: every benchmark, one module each (decode, quality, serve, online, sources, chaos, soak),
with what they share in ``common`` (percentiles, requests, polling with a deadline, closed-loop traffic, a private
cluster) and ``probes`` (a running cluster's processes and consumer group). ``commands`` holds their CLI.
Benches sit on top of everything: they import cluster, actors and kernels; nothing imports a bench."""
