"""The trainer as Ray runs it: ``build_trainer`` makes an OnlineTrainer (actors/trainer.py) from the config, and
``TrainerActor`` runs it on a background thread behind pause / resume / state calls (cluster/serve.py and
cluster/kuberay.py start it with ray.remote)."""
from __future__ import annotations

import logging
import queue
import threading

import redis
import torch

from onspec.actors.config import OnspecConfig
from onspec.actors.registry import DrafterRegistry
from onspec.actors.stream_reader import StreamReader
from onspec.actors.trainer import OnlineTrainer


def build_trainer(cfg: OnspecConfig, client: redis.Redis | None = None) -> OnlineTrainer:
    """Everything from the config: its own target copy, the registry, the serving (or initial) drafter."""
    from onspec.actors.checkpoint import load_checkpoint
    from onspec.actors.models import load_target, make_drafter, stop_token_ids

    torch.set_num_threads(cfg.trainer.threads)
    # The trainer's teacher runs transformers' own forward over whole windows, not the serving step: it builds
    # no compiled layers (which would race the replicas' first build for the same cores).
    target, tok = load_target(cfg.model.model_copy(update={"threads": cfg.trainer.threads, "compiled_layers": False}),
                              cfg.data_dir)
    client = client or redis.Redis.from_url(cfg.redis.url, socket_timeout=10, socket_connect_timeout=10)
    registry = DrafterRegistry(client, cfg.data_dir, cfg.registry.prefix)
    if cfg.drafter.checkpoint:
        initial, _ = load_checkpoint(cfg.drafter.checkpoint, target)
    else:
        initial = make_drafter(target, cfg.drafter, always_keep=tuple(stop_token_ids(target, tok)))
    registry.ensure_registered(initial)
    serving = registry.serving()
    drafter = registry.load(serving, target) if serving and serving != initial.version else initial
    reader = StreamReader(client, cfg.redis.stream_key, cfg.trainer.consumer_group, cfg.trainer.consumer,
                          cfg.trainer.claim_idle_ms, cfg.trainer.read_count)
    reader.ensure_group()
    return OnlineTrainer(cfg, target, drafter, registry, reader)


class TrainerActor:
    """The Ray actor (cluster/serve.py starts it with ray.remote): the trainer on a background thread."""

    def __init__(self, cfg: dict, journal: str | None = None):
        logging.basicConfig(level=logging.INFO)
        self.cfg = OnspecConfig.model_validate(cfg)
        self._stop, self._paused = threading.Event(), threading.Event()
        built: queue.SimpleQueue = queue.SimpleQueue()
        # Built on the training thread, so that the thread doing every step is the first to run torch's parallel
        # (OpenMP) work: a later thread's team ran matrix products 1.5x slower (BENCHMARKS.md, issue 16).
        self._thread = threading.Thread(target=self._main, args=(journal, built), name="onspec-trainer",
                                        daemon=True)
        self._thread.start()
        got = built.get()
        if isinstance(got, BaseException):
            raise got
        self.trainer = got

    def _main(self, journal: str | None, built: queue.SimpleQueue) -> None:
        try:
            trainer = build_trainer(self.cfg)
            if journal:  # fault benches and tests: which records each incarnation used (actors/journal.py)
                from onspec.actors.journal import TrainingJournal
                trainer.journal = TrainingJournal(journal)
        except BaseException as e:  # noqa: BLE001 -- handed to the constructor, which raises it
            built.put(e)
            return
        built.put(trainer)
        trainer.run(self._stop, self._paused)

    def state(self) -> dict:
        return {**self.trainer.state(), "paused": self._paused.is_set(), "alive": self._thread.is_alive()}

    def pause(self, timeout_s: float = 120.0) -> dict:
        """Stop computing; returns once the step in progress (if any) is done."""
        self._paused.set()
        self.trainer.idle.wait(timeout_s)
        return self.state()

    def resume(self) -> dict:
        self._paused.clear()
        return self.state()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
