"""Every method on the synthetic protocols: source training per architecture, Dice and recovery per target site in
both settings, cost as a ratio to unadapted inference, cost per update as a ratio to one TENT step, peak memory, and
norm-net's recovery against its number of updates. Every ratio is measured in this one run. Prints figures; asserts
nothing.

    python benchmarks/methods.py [--protocols synth-mri synth-ct synth-oct] [--methods ...] [--epochs N]
                                 [--curve 10 25 50 100 200] [--curve-volumes 4] [--profile METHOD ...]
                                 [--results DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from medtta.data.datasets import open_dataset
from medtta.data.layout import load_volume
from medtta.data.preprocess import image_slices, to_native
from medtta.engine import (
    RunConfig,
    adapt_and_predict,
    create_adapter,
    method_source_model,
    predict_unadapted,
    resolve_device,
    run,
    seed_everything,
)
from medtta.metrics import mean, volume_dice
from medtta.models.training import source_model
from medtta.protocol import Protocol, resolve_protocol
from medtta.registry import ADAPTERS
from medtta.report import format_table

METHODS = ADAPTERS.list()  # every registered method, plugins included


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


class PeakHeap:
    """Peak bytes in use by malloc (glibc's mallinfo2: heap plus mmapped blocks, where CPU tensors live) above the
    level at entry, sampled every millisecond; unlike RSS it sees memory the allocator reuses."""

    def __enter__(self) -> PeakHeap:
        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _MallInfo2
        self.base = self.peak = self._in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _in_use(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._in_use())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def peak_memory_mib(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with PeakHeap() as peak:
        fn()
    return peak.mib


def timed(fn, device: torch.device, repeat: int = 3) -> float:
    """Mean seconds of `fn()` over `repeat` calls after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeat


def load_protocol(name: str, epochs: int | None) -> Protocol:
    protocol = resolve_protocol(name)
    if epochs is None:
        return protocol
    return dataclasses.replace(protocol, training=dataclasses.replace(protocol.training, epochs=epochs))


def method_table(protocol_name: str, methods: list[str], settings: list[str], results: Path, epochs: int | None,
                 in_domain: dict[str, float]) -> list[list[str]]:
    protocol = resolve_protocol(protocol_name)
    rows = []
    for method in methods:
        for setting in settings:
            config = RunConfig(method=method, setting=setting, results=results, epochs=epochs, progress=False)
            result = run(protocol, config)
            architecture = ADAPTERS.get(method).architecture
            in_domain[architecture] = result.dice_in_domain
            cases = [r for site in result.sites for r in site.rows]
            ratio = sum(r["seconds"] for r in cases) / sum(r["seconds_source"] for r in cases)
            for site in result.sites:
                s = site.summary
                rows.append([protocol_name, method, setting, site.site, f"{result.dice_in_domain:.3f}",
                             f"{s['dice_source']:.3f}", f"{s['dice']:.3f}", f"{s['dice_recovery']:+.3f}",
                             f"{int(s['collapsed_cases'])}/{int(s['cases'])}", f"{ratio:.1f}x"])
            print(format_table(["protocol", "method", "setting", "site", "in-domain", "source", "adapted", "recovery",
                                "collapsed", "cost vs unadapted"], rows[-len(result.sites):]), flush=True)
    return rows


def training_table(protocol_name: str, results: Path, epochs: int | None, in_domain: dict[str, float],
                   device: torch.device) -> str:
    """Source-training seconds (network and post-training stages) of each architecture the methods used, as
    recorded when it was trained in this run, next to its in-domain Dice."""
    protocol = load_protocol(protocol_name, epochs)
    dataset = open_dataset(protocol)
    rows, seconds = [], {}
    for architecture in sorted(in_domain, key=lambda a: (a != "unet", a)):
        _, record = source_model(protocol, dataset, architecture, 0, results, device, progress=False)
        seconds[architecture] = record["train_seconds"]
        stages = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in record["stages"].items()) or "-"
        rows.append([protocol_name, architecture, f"{in_domain[architecture]:.3f}", f"{record['val_dice']:.3f}",
                     f"{record['seconds']:.0f}", stages, f"{seconds[architecture]:.0f}",
                     f"{seconds[architecture] / seconds.get('unet', float('nan')):.2f}x"])
    return format_table(["protocol", "architecture", "in-domain", "val", "network s", "stages", "total s", "vs unet"],
                        rows)


def first_target_slices(protocol: Protocol, dataset, device: torch.device) -> torch.Tensor:
    """The slices of the first test volume of the protocol's first target site, on which costs are timed."""
    case = dataset.cases_of(protocol.target_sites[0], "test")[0]
    return image_slices(load_volume(case, protocol.labels), protocol.preprocessing).to(device)


def adapter_and_unadapted(method: str, protocol: Protocol, dataset, x: torch.Tensor, results: Path,
                          device: torch.device) -> tuple[torch.nn.Module, float]:
    """`method` (seed 0) around its source model, and the seconds of that model's unadapted inference on `x`,
    timed before the adapter changes the model."""
    model, record = method_source_model(method, protocol, dataset, 0, results, device, progress=False)
    unadapted = timed(lambda: predict_unadapted(model, x, 32), device)
    seed_everything(0)
    return create_adapter(method, model, record).to(device), unadapted


def cost_table(protocol_name: str, methods: list[str], results: Path, device: torch.device,
               epochs: int | None) -> list[list[str]]:
    """Per method on the first test volume of the first target site: one update (one pass over the volume) as a
    ratio to unadapted inference and to a TENT step, the episodic adaptation of the volume as a ratio to unadapted
    inference, and peak memory."""
    protocol = load_protocol(protocol_name, epochs)
    dataset = open_dataset(protocol)
    x = first_target_slices(protocol, dataset, device)
    rows, per_update = [], {}
    warm_up, _ = source_model(protocol, dataset, "unet", 0, results, device, progress=False)
    timed(lambda: predict_unadapted(warm_up, x, 32), device)  # the process's first convolutions set up oneDNN
    for method in ["tent", *[m for m in methods if m != "tent"]]:
        cls = ADAPTERS.get(method)
        adapter, unadapted = adapter_and_unadapted(method, protocol, dataset, x, results, device)
        update = timed(lambda a=adapter: a.update(x), device) if adapter.optimizer is not None else float("nan")
        per_update[method] = update
        episodic = timed(lambda a=adapter, s=cls.default_steps: adapt_and_predict(a, x, "episodic", s, 32), device,
                         repeat=1)
        memory = peak_memory_mib(lambda a=adapter, s=cls.default_steps: adapt_and_predict(a, x, "episodic", s, 32),
                                 device)
        steps = [f"{update / unadapted:.1f}x", f"{update / per_update['tent']:.2f}"] if adapter.optimizer else ["-"] * 2
        rows.append([protocol_name, method, str(cls.default_steps), *steps, f"{episodic / unadapted:.1f}x",
                     f"{memory:.0f}"])
    return rows


def profile_episode(protocol_name: str, method: str, results: Path, device: torch.device,
                    epochs: int | None) -> str:
    """Where the time goes: the operators of `method`'s episodic adaptation and prediction of the first test
    volume of the first target site, by self time (torch.profiler), next to unadapted inference of that volume."""
    protocol = load_protocol(protocol_name, epochs)
    dataset = open_dataset(protocol)
    x = first_target_slices(protocol, dataset, device)
    adapter, unadapted = adapter_and_unadapted(method, protocol, dataset, x, results, device)
    steps = ADAPTERS.get(method).default_steps
    episode = timed(lambda: adapt_and_predict(adapter, x, "episodic", steps, 32), device)
    with torch.profiler.profile() as prof:
        adapt_and_predict(adapter, x, "episodic", steps, 32)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return (f"{method}: one volume {episode * 1e3:.0f} ms = {episode / unadapted:.1f}x unadapted inference "
            f"({unadapted * 1e3:.0f} ms)\n{table}")


def norm_net_curve(protocol_name: str, steps: list[int], volumes: int, results: Path, device: torch.device,
                   epochs: int | None) -> list[list[str]]:
    """Dice of norm-net against its updates per volume, on the first `volumes` test volumes of each site."""
    protocol = load_protocol(protocol_name, epochs)
    dataset = open_dataset(protocol)
    model, _ = source_model(protocol, dataset, ADAPTERS.get("norm-net").architecture, 0, results, device,
                            progress=False)
    rows = []
    for site in protocol.target_sites:
        volumes_ = [load_volume(c, protocol.labels) for c in dataset.cases_of(site, "test")[:volumes]]
        inputs = [image_slices(v, protocol.preprocessing).to(device) for v in volumes_]
        adapter = ADAPTERS.create("norm-net", model).to(device)
        dice = {}
        for n in [0, *steps]:
            seed_everything(0)
            start = time.perf_counter()
            predictions = [to_native(adapt_and_predict(adapter, x, "episodic", n, 32), v, protocol.preprocessing)
                           for x, v in zip(inputs, volumes_, strict=True)]
            scores = [volume_dice(pred, torch.as_tensor(v.label), protocol.scored_labels)["dice"]
                      for pred, v in zip(predictions, volumes_, strict=True)]
            dice[n] = mean(scores)
            seconds = (time.perf_counter() - start) / len(inputs)
            rows.append([site, str(n), f"{dice[n]:.3f}", f"{dice[n] - dice[0]:+.3f}", f"{seconds:.1f}"])
        print(format_table(["site", "updates", "dice", "gain", "s/volume"], rows[-len(steps) - 1:]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", nargs="*", default=["synth-mri", "synth-ct", "synth-oct"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--settings", nargs="+", default=["episodic", "continual"])
    parser.add_argument("--epochs", type=int, help="source-training epochs (default: each protocol's)")
    parser.add_argument("--curve", nargs="*", type=int, default=[10, 25, 50, 100, 200],
                        help="norm-net updates per volume to measure on synth-mri")
    parser.add_argument("--curve-volumes", type=int, default=4, help="test volumes per site for the curve")
    parser.add_argument("--tables", nargs="*", choices=["methods", "training", "cost"],
                        default=["methods", "training", "cost"], help="which tables to print per protocol (training "
                        "needs the methods table of the same run, or their models in --results)")
    parser.add_argument("--profile", nargs="*", default=[], metavar="METHOD",
                        help="methods whose episodic adaptation of one volume to profile, per protocol")
    parser.add_argument("--results", type=Path, help="results dir (default: a fresh temporary one)")
    args = parser.parse_args()
    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        results = args.results or Path(tmp) / "results"
        os.environ.setdefault("MEDTTA_DATA", f"{tmp}/data")
        for name in args.protocols:
            in_domain: dict[str, float] = {}
            if "methods" in args.tables:
                rows = method_table(name, args.methods, args.settings, results, args.epochs, in_domain)
                print(f"\n== {name}: all methods ==\n" + format_table(
                    ["protocol", "method", "setting", "site", "in-domain", "source", "adapted", "recovery",
                     "collapsed", "cost vs unadapted"], rows))
            if "training" in args.tables:
                print(f"\n== {name}: source training per architecture ==")
                print(training_table(name, results, args.epochs, in_domain, device))
            if "cost" in args.tables:
                print(f"\n== {name}: cost per update and peak memory ({device.type}) ==")
                print(format_table(["protocol", "method", "steps", "update vs unadapted", "update / TENT step",
                                    "episodic vs unadapted",
                                    "peak MiB"], cost_table(name, args.methods, results, device, args.epochs)))
            for method in args.profile:
                print(f"\n== {name}: profile of {method} on one volume (episodic) ==")
                print(profile_episode(name, method, results, device, args.epochs))
        if args.curve:
            print("\n== norm-net on synth-mri: Dice against updates per volume ==")
            norm_net_curve("synth-mri", args.curve, args.curve_volumes, results, device, args.epochs)


if __name__ == "__main__":
    main()
