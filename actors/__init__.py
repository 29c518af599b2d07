"""What runs inside the processes: the typed config (``config``), the models and drafters, the speculative
engine (``engine``: continuous batching, verification rounds) and the serving replica around it, the rejection
stream's writer and reader, the online trainer (``trainer``, its data path in ``windows`` / ``stream_reader``,
its Ray actor in ``trainer_actor``), the drafter registry and hot swap.
Imports go kernels <- actors <- cluster: actors import kernels and each other, never ``onspec.cluster``."""
