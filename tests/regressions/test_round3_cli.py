"""Regressions of the third round of probes in the training command's own
files (results.json after every epoch on every engine and on
Ctrl-C, --out holding only the current run's files, a write error in one
line). Each failed on the tree before the fix."""
import errno
import json
import os

import pytest

TINY = ["--train-size", "100", "--test-size", "70", "--batch-size", "32", "--epochs", "2", "--no-progress"]


def _run(argv):
    from sampa_fused import train as T
    args = T.build_parser().parse_args(argv)
    return T.run_experiment(args, log=lambda *a: None)


def _spy_writes(monkeypatch):
    from sampa_fused.train import cli
    seen = []
    real = cli._write_json

    def spy(path, results):
        real(path, results)
        with open(path) as f:
            seen.append(json.load(f))
    monkeypatch.setattr(cli, "_write_json", spy)
    return seen


def test_results_json_after_every_epoch_of_a_run_on_processes(tmp_path, monkeypatch):
    seen = _spy_writes(monkeypatch)
    _run(["compare", "--methods", "sam@2p", "--seeds", "0", "--threads", "1", "--out", str(tmp_path)] + TINY)
    assert [len(r["runs"][-1]["epochs"]) for r in seen[:-1]] == [2, 3]
    assert [r["complete"] for r in seen] == [False, False, True]


def test_ctrl_c_writes_results_json_once_more(tmp_path, monkeypatch):
    from sampa_fused.train import cli
    real = cli.train_one

    def interrupted(*args, on_epoch=None, **kw):
        def after_epoch(rec):
            on_epoch(rec)
            raise KeyboardInterrupt
        return real(*args, on_epoch=after_epoch, **kw)
    monkeypatch.setattr(cli, "train_one", interrupted)
    with pytest.raises(SystemExit, match="interrupted.*results.json"):
        _run(["compare", "--methods", "sgd,sam", "--seeds", "0", "--out", str(tmp_path)] + TINY)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["complete"] is False and res["interrupted"] is True
    assert len(res["runs"]) == 1 and len(res["runs"][0]["epochs"]) == 2


def test_out_holds_only_the_current_runs_files(tmp_path):
    (tmp_path / "accuracy_vs_lambda.png").write_bytes(b"stale")
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="--out .* is not empty.*--overwrite"):
        _run(["compare", "--methods", "sgd", "--seeds", "0", "--out", str(tmp_path)] + TINY)
    assert (tmp_path / "accuracy_vs_lambda.png").exists()
    _run(["compare", "--methods", "sgd", "--seeds", "0", "--out", str(tmp_path), "--overwrite"] + TINY)
    assert not (tmp_path / "accuracy_vs_lambda.png").exists()
    assert (tmp_path / "results.json").exists() and (tmp_path / "comparison.png").exists()
    (tmp_path / "notes.txt").write_text("mine")        # not ours: never removed
    with pytest.raises(SystemExit, match="notes.txt"):
        _run(["compare", "--methods", "sgd", "--seeds", "0", "--out", str(tmp_path), "--overwrite"] + TINY)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_write_error_is_one_line_naming_path_and_cause(tmp_path, monkeypatch):
    from sampa_fused.train import cli

    def full_disk(obj, f, **kw):
        f.write("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(cli.json, "dump", full_disk)
    path = str(tmp_path / "results.json")
    with pytest.raises(SystemExit) as e:
        _run(["compare", "--methods", "sgd", "--seeds", "0", "--out", str(tmp_path)] + TINY)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and "No space left on device" in msg
    assert os.listdir(tmp_path) == []
