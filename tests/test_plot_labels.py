"""The main job's plots say where each curve ran: engine, processes and
threads in each legend entry, not one title for runs that differ in them."""
import matplotlib
import pytest

from sampa_fused import train as T

matplotlib.use("Agg")
TINY = ["--train-size", "100", "--test-size", "70", "--batch-size", "32", "--epochs", "1", "--no-progress"]


@pytest.fixture
def drawn(monkeypatch):
    """(titles, legend texts) of every figure the run saves."""
    from matplotlib.figure import Figure
    seen = {"titles": [], "legends": []}
    save = Figure.savefig

    def record(fig, *a, **kw):
        if fig._suptitle is not None:
            seen["titles"].append(fig._suptitle.get_text())
        for ax in fig.axes:
            seen["titles"].append(ax.get_title())
            if ax.get_legend() is not None:
                seen["legends"].append([t.get_text() for t in ax.get_legend().get_texts()])
        return save(fig, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", record)
    return seen


def test_each_curve_names_its_engine_processes_and_threads(tmp_path, drawn):
    args = T.build_parser().parse_args(["compare", "--methods", "sgd,sam@2t,sampa-0.2@2p", "--seeds", "0",
                                        "--threads", "1", "--out", str(tmp_path)] + TINY)
    T.run_experiment(args, log=lambda *a: None)
    assert drawn["legends"]
    for legend in drawn["legends"]:
        assert legend == ["SGD (plain torch.optim, 1 process, 1 thread)",
                          "SAM@2t (serial, 1 process, 2 threads)",
                          "SAMPa-0.2@2p (distributed, 2 processes, 1 thread)"]
    for title in drawn["titles"]:
        assert "engine" not in title and " x1" not in title and " x2" not in title
