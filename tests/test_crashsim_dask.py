"""`--executor`: crash explorations on a Dask distributed cluster print exactly what `--jobs 1` prints.

A two-worker LocalCluster (worker processes, loopback only) is started once
for the module and closed in its finalizer.  Every comparison goes through
the command line and its JSON, with the wall-clock fields taken out.
"""
from __future__ import annotations

import json
import shlex
import sys
import distributed
import pytest

from lamina.crashsim import executors
from lamina.crashsim.cli import main as crashsim_main


@pytest.fixture(scope="module")
def scheduler(request) -> str:
    # No dashboard; the scheduler's HTTP server (metrics) still starts: on a free loopback port, not on 8787.
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       host="127.0.0.1", scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    request.addfinalizer(cluster.close)
    return cluster.scheduler_address


def _without_clock(value):
    """The JSON with every `seconds` field dropped: the only thing an executor may change."""
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


def _json_of(capsys, argv: list[str]) -> tuple[int, object]:
    capsys.readouterr()
    code = crashsim_main(argv)
    return code, _without_clock(json.loads(capsys.readouterr().out))


@pytest.mark.parametrize("extra", [
    ["overwrite", "allocate", "--model", "strict,reorder"],
    ["allocate", "overwrite", "--model", "strict,torn", "--control", "skip-intent"],  # failures, shrunk plans
], ids=["passing", "failing-control"])
def test_run_on_a_dask_cluster_equals_one_job(scheduler, capsys, extra):
    serial = _json_of(capsys, ["run", *extra, "--recovery-images", "2", "--jobs", "1", "--output", "json"])
    spread = _json_of(capsys, ["run", *extra, "--recovery-images", "2", "--executor", scheduler, "--output", "json"])
    assert spread == serial
    code, report = serial
    assert len(report["results"]) == 4 and sum(r["states"] for r in report["results"]) > 100
    assert code == (1 if "--control" in extra else 0)
    assert (code == 1) == any(r["failures"] for r in report["results"])


def test_the_dask_scheme_names_the_same_scheduler(scheduler, capsys):
    dask_address = scheduler.replace("tcp://", "dask://")
    argv = ["run", "overwrite", "--model", "strict", "--recovery-images", "1", "--output", "json"]
    assert _json_of(capsys, [*argv, "--executor", dask_address]) == _json_of(capsys, argv)


def test_crash_repair_on_a_dask_cluster_equals_one_job(scheduler, capsys):
    argv = ["inject", "overwrite", "--crash-repair", "--model", "strict", "--max-subset", "1", "--samples", "1",
            "--torn-samples", "1", "--output", "json"]
    serial = _json_of(capsys, [*argv, "--jobs", "1"])
    assert _json_of(capsys, [*argv, "--executor", scheduler]) == serial
    assert serial[1]["crash_repair"]["results"][0]["faults"] > 8  # more than one slice of faults


_CHECK = f"{shlex.quote(sys.executable)} -c \"import sys; d=open(sys.argv[1]+'/target','rb').read(); " \
         "sys.exit(d not in (b'old', b'new'*2000))\" {dir}"
_BAD = "open('t','wb').write(b'new'*2000); import os; os.rename('t','target')"


def test_explore_of_a_recorded_trace_on_a_dask_cluster_equals_one_job(scheduler, tmp_path, capsys):
    """The known-bad write-then-rename program: same states, same distinct directories checked, same failing plans."""
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "target").write_bytes(b"old")
    trace = str(tmp_path / "t.trace")
    assert crashsim_main(["record", "--dir", str(tmp_path / "run"), "--init", str(tmp_path / "init"), "--out", trace,
                          "--", sys.executable, "-c", _BAD]) == 0
    argv = ["explore", trace, "--check", _CHECK, "--model", "strict,reorder", "--output", "json"]
    serial = _json_of(capsys, [*argv, "--jobs", "1"])
    assert _json_of(capsys, [*argv, "--executor", scheduler]) == serial
    assert _json_of(capsys, [*argv, "--jobs", "2"]) == serial
    code, report = serial
    assert code == 1 and report["failing"] > 0 and report["checked"] > 2
    assert [r["model"] for r in report["results"]] == ["strict", "reorder"]


@pytest.mark.parametrize("address, says", [
    ("tcp://127.0.0.1:9", "no Dask scheduler answered within"),
    ("dask://127.0.0.1", "expected dask://HOST:PORT"),
    ("spark://127.0.0.1:7077", "expected `local`, dask://HOST:PORT or tcp://HOST:PORT"),
])
def test_an_unusable_executor_is_a_named_error_on_one_line(capsys, monkeypatch, address, says):
    monkeypatch.setattr(executors, "CONNECT_TIMEOUT_S", 1.0)
    capsys.readouterr()
    assert crashsim_main(["run", "overwrite", "--model", "strict", "--executor", address]) == executors.ExecutorUnavailable.exit_code == 9
    err = capsys.readouterr().err
    assert err.startswith(f"crashsim: error: executor {address!r}: ") and says in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_scheduler_without_workers_is_the_named_error_not_a_hang(capsys, monkeypatch):
    monkeypatch.setattr(executors, "CONNECT_TIMEOUT_S", 1.0)
    with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=None, host="127.0.0.1",
                                  scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as empty:
        capsys.readouterr()
        assert crashsim_main(["run", "overwrite", "--model", "strict", "--executor", empty.scheduler_address]) == 9
    err = capsys.readouterr().err
    assert "the scheduler has no workers" in err and len(err.strip().splitlines()) == 1


def test_without_distributed_an_address_is_the_named_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now raises ImportError
    capsys.readouterr()
    assert crashsim_main(["run", "overwrite", "--executor", "tcp://127.0.0.1:8786"]) == 9
    err = capsys.readouterr().err
    assert "needs the `distributed` package" in err and len(err.strip().splitlines()) == 1
