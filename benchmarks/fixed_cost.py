"""Where the wall time of a cached `medtta run` goes: Python's start, imports, the dataset check, the source model,
the in-domain Dice, adaptation and prediction, metrics, tracking and the rest. Runs the command in a fresh process
(as a user does), then again in the same process (as `medtta bench` runs its cells), timing each phase exclusively
(a phase's time excludes the phases and imports inside it). Prints figures; asserts nothing.

    python benchmarks/fixed_cost.py [--method bn-stats] [--dataset synth-oct] [--device cpu] [--results DIR]

The target of issue 21: at most 25 % of the wall time outside adaptation and prediction.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import importlib
import inspect
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ADAPT = "adapt+predict"
#: (module, attribute path, phase): what each phase times
PHASES = [
    ("medtta.engine", "prepare_dataset", "dataset check"),
    ("medtta.engine", "method_source_model", "source model"),
    ("medtta.engine", "SourcePredictions.in_domain_dice", "in-domain Dice"),
    ("medtta.engine", "SourcePredictions.of", "unadapted (cached)"),
    ("medtta.engine", "adapt_and_predict", ADAPT),
    ("medtta.engine", "to_native", "metrics"),
    ("medtta.engine", "volume_metrics", "metrics"),
    ("medtta.engine", "collapse_reason", "metrics"),
    ("medtta.engine", "foreground_voxels", "metrics"),
    ("medtta.engine", "Engine._log_qualitative", "qualitative slices"),
    ("medtta.tracking", "Tracker.__init__", "tracking"),
    ("medtta.tracking", "Tracker.close_stale_runs", "tracking"),
    ("medtta.tracking", "Tracker.log_metrics", "tracking"),
    ("medtta.tracking", "Tracker.log_table", "tracking"),
    ("medtta.tracking", "Tracker.log_artifact", "tracking"),
    ("mlflow", "start_run", "tracking"),
    ("mlflow", "log_params", "tracking"),
    ("mlflow.tracking.fluent", "end_run", "tracking"),
]


class Phases:
    """Exclusive wall time per phase: a phase nested in another counts for itself only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [name, seconds of the phases inside]

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self._open.append([name, 0.0])
        try:
            yield
        finally:
            total = time.perf_counter() - start
            self.seconds[name] += total - self._open.pop()[1]
            if self._open:
                self._open[-1][1] += total


def _timed(fn: Callable, phases: Phases, name: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with phases(name):
            return fn(*args, **kwargs)
    return wrapper


def _patch(module: str, path: str, phases: Phases, name: str) -> None:
    *owners, attr = path.split(".")
    owner = functools.reduce(getattr, owners, sys.modules[module])
    if not hasattr(owner, attr):  # an older medtta, measured for comparison
        return
    fn = inspect.getattr_static(owner, attr)
    if isinstance(fn, staticmethod):
        setattr(owner, attr, staticmethod(_timed(fn.__func__, phases, name)))
    else:
        setattr(owner, attr, _timed(fn, phases, name))


def _imported(name: str) -> bool:
    """`name` imported to its end (a module being imported is in sys.modules already)."""
    module = sys.modules.get(name)
    return module is not None and not getattr(module.__spec__, "_initializing", False)


def instrument(phases: Phases) -> None:
    """Times every import, and patches each phase's function as soon as its module is imported."""
    pending = list(PHASES)
    original_import, original_import_module = builtins.__import__, importlib.import_module

    def patch_imported() -> None:
        for entry in [e for e in pending if _imported(e[0])]:
            pending.remove(entry)
            _patch(entry[0], entry[1], phases, entry[2])

    def timed_import(*args: Any, **kwargs: Any) -> Any:
        with phases("imports"):
            module = original_import(*args, **kwargs)
        if pending:
            patch_imported()
        return module

    builtins.__import__ = timed_import
    importlib.import_module = _timed(original_import_module, phases, "imports")


def child(args: list[str], repeat: int, out: Path) -> None:
    """Runs `medtta <args>` `repeat` times in this process; writes each run's phases to `out`."""
    phases, runs = Phases(), []
    instrument(phases)
    for _ in range(repeat):
        phases.seconds.clear()
        start = time.perf_counter()
        from medtta.cli.main import main

        main(args, standalone_mode=False)
        runs.append({"wall": time.perf_counter() - start, **phases.seconds})
    out.write_text(json.dumps(runs))


def measure(args: list[str], repeat: int) -> tuple[float, list[dict[str, float]]]:
    """The fresh process's wall time (Python's start included) and the phases of each run in it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "phases.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child", str(out), "--repeat", str(repeat), "--", *args],
                       check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        return wall, json.loads(out.read_text())


def table(process_wall: float, runs: list[dict[str, float]]) -> str:
    first, *later = runs
    columns = [("fresh process", {**first, "python start": process_wall - first["wall"], "wall": process_wall})]
    columns += [("run again in it", run) for run in later]
    names = ["python start", "imports", "dataset check", "source model", "unadapted (cached)", "in-domain Dice",
             ADAPT, "metrics", "qualitative slices", "tracking"]
    lines = [f"{'phase':<20}" + "".join(f"{title:>22}" for title, _ in columns)]
    for name in [*names, "other"]:
        cells = []
        for _, run in columns:
            seconds = run.get(name, 0.0) if name != "other" else run["wall"] - sum(run.get(n, 0.0) for n in names)
            cells.append(f"{seconds:8.2f} s {100 * seconds / run['wall']:5.1f} %   ")
        lines.append(f"{name:<20}" + "".join(f"{c:>22}" for c in cells))
    lines.append(f"{'wall':<20}" + "".join(f"{run['wall']:8.2f} s {'':>10}" for _, run in columns))
    outside = [1 - run.get(ADAPT, 0.0) / run["wall"] for _, run in columns]
    lines.append(f"{'outside ' + ADAPT:<20}" + "".join(f"{100 * o:16.1f} %     " for o in outside))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="bn-stats")
    parser.add_argument("--dataset", default="synth-oct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, help="results dir with the source model cached (default: a new one)")
    parser.add_argument("--repeat", type=int, default=2, help="runs in the one process")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.rest, args.repeat, args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = args.results or Path(tmp)
        cli = ["run", "--method", args.method, "--dataset", args.dataset, "--device", args.device,
               "--results", str(results), "-q"]
        subprocess.run([sys.executable, "-m", "medtta", *cli], check=True, stdout=subprocess.DEVNULL)  # cache it
        wall, runs = measure(cli, args.repeat)
    print(f"cached `medtta {' '.join(cli[:7])}` ({args.repeat} runs in one process):\n")
    print(table(wall, runs))


if __name__ == "__main__":
    main()
