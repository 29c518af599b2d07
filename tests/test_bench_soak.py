"""The soak report's arithmetic on made-up samples, and process sampling on this test's own processes (the
30-minute soak itself is `onspec bench soak`, run by hand: BENCHMARKS.md)."""
import subprocess
import sys
import time

import psutil
import pytest
from onspec.cluster.bench.soak import sample_processes, soak_report


def _sample(t, rss: dict, sent, completed, failed, hung, drafted, accepted, tokens, steps, version="base"):
    procs = {k: {"label": k.split("#")[0], "pid": int(k.split("#")[1]), "rss_mib": v} for k, v in rss.items()}
    return {"t_s": t, "processes": procs,
            "traffic": {"sent": sent, "completed": completed, "failed": failed, "hung": hung,
                        "completion_tokens": tokens, "drafted": drafted, "accepted": accepted},
            "trainer": {"steps": steps, "records_acked": steps * 4, "serving_version": version, "alive": True,
                        "promoted": [] if version == "base" else [version]}}


def test_soak_report_figures():
    samples = [
        _sample(0, {"driver#1": 200.0, "replica#2": 800.0}, 0, 0, 0, 0, 0, 0, 0, 0),
        _sample(30, {"driver#1": 210.0, "replica#2": 900.0}, 10, 10, 0, 0, 100, 20, 300, 5),
        _sample(60, {"driver#1": 210.0, "replica#2": 905.0, "trainer#3": 1000.0}, 20, 19, 1, 0, 200, 50, 600, 9),
        _sample(90, {"driver#1": 212.0, "replica#2": 910.0, "trainer#3": 1100.0}, 30, 28, 1, 1, 300, 90, 900, 14,
                "v1"),
    ]
    r = soak_report(samples)
    assert r["duration_s"] == 90 and r["samples"] == 4
    assert (r["requests"], r["completed"], r["failed"], r["hung"]) == (30, 28, 1, 1)
    assert r["error_rate"] == pytest.approx(2 / 30, abs=1e-5)
    rep = r["memory"]["processes"]["replica#2"]
    assert (rep["first_mib"], rep["last_mib"], rep["max_mib"]) == (800.0, 910.0, 910.0)
    assert rep["growth_mib"] == 110.0 and rep["growth_pct"] == 13.75
    # Warm-up: the first third (30 s): growth is counted from the 30 s sample on.
    assert rep["growth_after_warmup_mib"] == 10.0 and rep["lived_whole_run"]
    late = r["memory"]["processes"]["trainer#3"]
    assert late["samples"] == 2 and not late["lived_whole_run"] and late["growth_mib"] == 100.0
    assert r["memory"]["max_growth_after_warmup_process"] == "replica"  # only whole-run processes compete
    assert r["memory"]["total_first_mib"] == 1000.0 and r["memory"]["total_last_mib"] == 1122.0
    # Acceptance per interval: 20/100, 30/100, 40/100; first third 0.2, last third 0.4.
    assert [i["acceptance"] for i in r["intervals"]] == [0.2, 0.3, 0.4]
    assert r["acceptance"] == {"first_third": 0.2, "last_third": 0.4, "change": 0.2}
    assert r["tokens_per_s"] == {"first_third": 10.0, "last_third": 10.0}
    assert r["trainer"] == {"steps": 14, "records_acked": 56, "promoted": ["v1"], "alive": True}
    assert r["intervals"][-1]["serving_version"] == "v1" and r["intervals"][1]["errors"] == 1
    with pytest.raises(ValueError):
        soak_report(samples[:1])


def test_sample_processes_leaves_out_an_unreaped_child():
    # An exited child nobody has waited for yet is a zombie: no memory, nothing to watch.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.05)
    try:
        procs = sample_processes()
        assert all(p["pid"] != child.pid for p in procs.values())
        assert all(p["rss_mib"] > 0 for p in procs.values())
    finally:
        child.wait()


def test_sample_processes_sees_this_process_and_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        procs = sample_processes()
        labels = {p["label"] for p in procs.values()}
        assert "driver" in labels and "python" in labels
        assert all(p["rss_mib"] > 0 for p in procs.values())
        assert any(p["pid"] == child.pid for p in procs.values())
    finally:
        child.kill()
        child.wait()
