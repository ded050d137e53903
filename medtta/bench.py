"""`medtta bench`: the grid of cells (method x protocol x seed x setting), each one parent run as `medtta run`
makes it. Datasets are checked and the source models trained, with their unadapted predictions, once per grid
before any cell runs; finished cells are skipped, so a killed grid resumes where it stopped; cells run in this
process, in N local processes, or as Ray tasks."""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from medtta.engine import Engine, RunConfig, prepare_dataset, requested_dims, run_name
from medtta.errors import MedttaError, MedttaWarning
from medtta.metrics import mean
from medtta.paths import results_root
from medtta.progress import progress_bar
from medtta.protocol import Protocol, list_protocols, resolve_protocol
from medtta.registry import ADAPTERS
from medtta.report import format_table
from medtta.streams import SETTINGS
from medtta.tracking import Tracker, experiment_name, parent_runs, previous, stale_message, tracking_uri

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Cell:
    """One parent run of the grid."""

    method: str
    protocol: Protocol
    seed: int
    setting: str
    config: tuple[tuple[str, Any], ...] = ()  # the swept hyper-parameters (and `steps`) of this cell, sorted
    data_changed: bool = field(default=False, compare=False)  # it finished before, on data since edited

    @property
    def name(self) -> str:
        """The run's name, naming the swept values that are not the method's defaults."""
        cls, swept = ADAPTERS.get(self.method), dict(self.config)
        steps = swept.pop("steps", cls.default_steps)
        return run_name(self.method, self.protocol.name, self.seed, self.setting, cls.config_tag(swept, steps))

    @property
    def key(self) -> tuple:
        return self.method, self.protocol.name, self.seed, self.setting, self.config


@dataclass(frozen=True)
class BenchConfig:
    """What `medtta bench` varies; `hparams` maps a method to its hyper-parameters."""

    methods: tuple[str, ...]
    protocols: tuple[Protocol, ...]
    seeds: tuple[int, ...] = (0,)
    settings: tuple[str, ...] = ("episodic",)
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweeps: dict[str, dict[str, tuple[Any, ...]]] = field(default_factory=dict)  # method -> key -> values tried
    run: RunConfig = field(default_factory=lambda: RunConfig(method="source"))  # steps, batch size, device, stores
    workers: int = 1
    executor: str = "local"


@dataclass
class Outcome:
    """What became of a cell: finished (now or before), failed, or left alone (running elsewhere)."""

    cell: Cell
    status: str  # "finished", "skipped", "failed", "running"
    run_id: str | None = None
    error: str | None = None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # ours, shown once per grid rather than once per cell


@dataclass
class BenchResult:
    outcomes: list[Outcome]
    prepare_seconds: float
    cells_seconds: float
    tracking_uri: str
    results: Path


def select_methods(spec: str) -> tuple[str, ...]:
    """`all`, or comma-separated names and fnmatch patterns (`'tent,bn-*'`), in registry order."""
    names = ADAPTERS.list()
    if spec.strip() == "all":
        return tuple(names)
    chosen: list[str] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        matched = fnmatch.filter(names, item)
        if not matched:
            raise MedttaError(f"--methods: no method matches '{item}' (available: {', '.join(names)})")
        chosen += [m for m in matched if m not in chosen]
    return tuple(chosen)


def select_settings(spec: str) -> tuple[str, ...]:
    """`all`, `both` (episodic and continual, as before the other settings existed) or comma-separated settings."""
    if spec.strip() in ("all", "both"):
        return SETTINGS if spec.strip() == "all" else ("episodic", "continual")
    chosen = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    for setting in chosen or (spec,):
        if setting not in SETTINGS:
            raise MedttaError(f"--setting '{setting}': expected all or comma-separated settings of "
                              f"{', '.join(SETTINGS)}")
    return chosen


def select_protocols(spec: str, source_site: str | None = None) -> tuple[Protocol, ...]:
    """Comma-separated protocol names, fnmatch patterns of them (`'synth-*'`), protocol YAML files or dataset
    folders (with `source_site`)."""
    builtin = list(list_protocols())
    chosen: list[Protocol] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if any(ch in item for ch in "*?["):
            names = fnmatch.filter(builtin, item)
            if not names:
                raise MedttaError(f"--datasets: no protocol matches '{item}' (available: {', '.join(builtin)})")
            chosen += [resolve_protocol(name) for name in names]
        else:
            chosen.append(resolve_protocol(item, source_site))
    return tuple(chosen)


def method_params(grouped: dict[str, dict[str, Any]], methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Hyper-parameters per method from `-p METHOD.KEY=VALUE` (`grouped[METHOD]`) and `-p KEY=VALUE`
    (`grouped[""]`: every method of the grid that has the key)."""
    shared = grouped.get("", {})
    for method in set(grouped) - {""} - set(methods):
        raise MedttaError(f"-p {method}.…: '{method}' is not a method of this grid ({', '.join(methods)})")
    for key in shared:
        if not any(key in ADAPTERS.get(m).defaults for m in methods):
            raise MedttaError(f"-p {key}=…: no method of this grid has the hyper-parameter '{key}'")
    return {m: {**{k: v for k, v in shared.items() if k in ADAPTERS.get(m).defaults}, **grouped.get(m, {})}
            for m in methods}


def sweep_spaces(requested: dict[str, dict[str, tuple[Any, ...]]], methods: tuple[str, ...]
                 ) -> dict[str, dict[str, tuple[Any, ...]]]:
    """`--sweep` (METHOD or `all` -> KEY -> values; no keys: the method's declared search space) checked against the
    grid's methods and their hyper-parameters, as method -> key -> values."""
    spaces: dict[str, dict[str, tuple[Any, ...]]] = {}
    for name, keys in requested.items():
        if name != "all" and name not in methods:
            raise MedttaError(f"--sweep {name}: not a method of this grid ({', '.join(methods)})")
        for method in methods if name == "all" else (name,):
            cls = ADAPTERS.get(method)
            for key in keys:
                if key != "steps" and key not in cls.defaults:
                    raise MedttaError(f"--sweep {method}.{key}: {method} has no hyper-parameter '{key}' (it has: "
                                      f"{', '.join([*cls.defaults, 'steps'])})")
            spaces[method] = {**spaces.get(method, {}), **(keys or cls.sweep_space())}
    return spaces


def configurations(space: dict[str, tuple[Any, ...]]) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of a method's swept values (keys sorted); one empty configuration without a sweep."""
    keys = sorted(space)
    return [tuple(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))]


def adapts_network(method: str, protocol: Protocol, config: BenchConfig) -> bool:
    """Whether `method` adapts networks of the dimensions `protocol` runs in (`-a spatial_dims`, else its `dims`) and
    of the normalization `-a norm` builds."""
    cls = ADAPTERS.get(method)
    return (requested_dims(protocol, config.run.arch_config) in cls.spatial_dims
            and not cls.norm_refusal(config.run.arch_config.get("norm", "batch")))


def grid(config: BenchConfig) -> list[Cell]:
    """Every cell, protocol by protocol (cells of one source model run together); a method is left out of a protocol
    whose network dimensions or normalization it does not adapt (`left_out`)."""
    return [Cell(m, p, seed, setting, swept) for p in config.protocols for seed in config.seeds
            for setting in config.settings for m in config.methods if adapts_network(m, p, config)
            for swept in configurations(config.sweeps.get(m, {}))]


def left_out(config: BenchConfig) -> list[str]:
    """`method on protocol (3D, instance norm)` for every pair the grid leaves out, the method adapting networks of
    other dimensions or normalization only."""
    norm = config.run.arch_config.get("norm", "batch")
    return [f"{m} on {p.name} ({requested_dims(p, config.run.arch_config)}D, {norm} norm)"
            for p in config.protocols for m in config.methods if not adapts_network(m, p, config)]


def engine_of(cell: Cell, config: BenchConfig, progress: bool = False) -> Engine:
    swept = dict(cell.config)
    steps = swept.pop("steps", config.run.steps)
    run = replace(config.run, method=cell.method, setting=cell.setting, seed=cell.seed, steps=steps,
                  hparams={**config.hparams.get(cell.method, {}), **swept}, progress=progress)
    return Engine(cell.protocol, run)


# --- what a worker runs -------------------------------------------------------------------------------------------

def _use_threads(threads: int) -> None:
    torch.set_num_threads(threads)


@contextmanager
def _our_warnings() -> Iterator[list[str]]:
    """Collects our warnings (their messages) instead of printing them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MedttaWarning)
        messages: list[str] = []
        yield messages
    messages += [str(w.message) for w in caught if issubclass(w.category, MedttaWarning)]


def warm_source(cell: Cell, config: BenchConfig, progress: bool = False) -> Outcome:
    """Train or load the source model `cell` adapts, and compute its unadapted predictions of every test case
    the grid scores (and the in-domain Dice's): what every cell on that model shares. `progress` shows the
    training's epochs (only where the bars of several workers cannot interleave)."""
    start = time.perf_counter()
    engine = engine_of(cell, config, progress)
    with _our_warnings() as messages:
        dataset, volumes = engine.data()
        _, _, unadapted = engine.source(dataset, volumes)
        p = engine.protocol
        for site in (p.source_site, *p.target_sites):
            for case in dataset.cases_of(site, "test"):
                unadapted.of(case)
    return Outcome(cell, "prepared", seconds=time.perf_counter() - start, warnings=messages)


def run_cell(cell: Cell, config: BenchConfig) -> Outcome:
    """One cell as `medtta run` runs it; a failure is returned, not raised, so the grid goes on."""
    start = time.perf_counter()
    engine = engine_of(cell, config)
    with _our_warnings() as messages:
        try:
            result = engine.run()
        except MedttaError as err:
            outcome = Outcome(cell, "failed", error=str(err))
        except Exception as err:  # a bug in a method must not stop the grid; its traceback is kept
            log = engine.results / "bench" / f"failed-{engine.cell()}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc(), encoding="utf-8")
            outcome = Outcome(cell, "failed", error=f"{type(err).__name__}: {err} (traceback in {log})")
        else:
            harm = {"source_site_harm": result.source_site.summary["source_site_harm"]} if result.source_site else {}
            outcome = Outcome(cell, "finished", result.run_id, metrics={
                "dice": mean([s.summary["dice"] for s in result.sites]),
                "dice_recovery": mean([s.summary["dice_recovery"] for s in result.sites]), **harm})
    outcome.seconds, outcome.warnings = time.perf_counter() - start, messages
    return outcome


# --- executors ----------------------------------------------------------------------------------------------------

def _threads_per_worker(workers: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // workers)


def execute(fn: Callable[..., Any], tasks: list[tuple], workers: int, executor: str) -> Iterator[Any]:
    """`fn(*task)` for every task, yielded as they complete: here (one worker), in `workers` local processes
    (CPU threads split between them), or as Ray tasks."""
    if executor == "ray":
        yield from _execute_ray(fn, tasks, workers)
    elif workers <= 1:
        yield from (fn(*task) for task in tasks)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_use_threads,
                                 initargs=(_threads_per_worker(workers),)) as pool:
            futures = [pool.submit(fn, *task) for task in tasks]
            yield from (future.result() for future in as_completed(futures))


def _execute_ray(fn: Callable[..., Any], tasks: list[tuple], workers: int) -> Iterator[Any]:
    try:
        import ray
    except ImportError:
        raise MedttaError("--executor ray needs Ray: pip install 'medtta[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address="auto", log_to_driver=False)  # an existing cluster
        except ConnectionError:
            ray.init(num_cpus=max(workers, 1), log_to_driver=False, include_dashboard=False)
    threads = _threads_per_worker(workers) if workers > 1 else 1
    remote = ray.remote(num_cpus=threads, num_gpus=1 if torch.cuda.is_available() else 0)(_with_threads)
    pending = [remote.remote(fn, threads, *task) for task in tasks]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def _with_threads(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    _use_threads(threads)
    return fn(*args)


# --- resuming -----------------------------------------------------------------------------------------------------

def sort_out(cells: list[Cell], config: BenchConfig, client: MlflowClient) -> tuple[list[Cell], list[Outcome]]:
    """The cells still to run, and the outcomes of the others: finished before on the same data (skipped) or running
    elsewhere (stale runs of dead processes were marked KILLED before: their cells run again). A cell that finished
    only on other data (edited files, another split) runs again, as `data_changed`."""
    ids = [e.experiment_id for p in config.protocols if (e := client.get_experiment_by_name(experiment_name(p.name)))]
    runs = parent_runs(client, ids)
    data: dict[int, str] = {}  # the fingerprint of each protocol's data, read once
    todo, done = [], []
    for cell in cells:
        engine = engine_of(cell, config)
        if id(cell.protocol) not in data:
            data[id(cell.protocol)] = engine.data_fingerprint()
        found = previous(runs.get(engine.cell(), []), data[id(cell.protocol)])
        if found.finished:
            done.append(Outcome(cell, "skipped", found.finished.info.run_id,
                                metrics=dict(found.finished.data.metrics)))
        elif found.running:
            tags = found.running.data.tags
            done.append(Outcome(cell, "running", found.running.info.run_id,
                                error=f"running in pid {tags.get('medtta.pid')} on {tags.get('medtta.host')}"))
        else:
            todo.append(replace(cell, data_changed=found.other_data))
    return todo, done


# --- the grid -----------------------------------------------------------------------------------------------------

def check(config: BenchConfig) -> None:
    """Fail before anything runs on a setting, method, hyper-parameter or architecture config that is wrong."""
    if config.executor not in EXECUTORS:
        raise MedttaError(f"--executor '{config.executor}': expected one of {', '.join(EXECUTORS)}")
    for cell in grid(config):
        engine_of(cell, config)


def bench(config: BenchConfig, progress: bool = True, echo: Callable[[str], None] = print) -> BenchResult:
    """Run every cell of the grid not finished yet (the Python API behind `medtta bench`)."""
    check(config)
    results = results_root(config.run.results)
    results.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(config.run.tracking_uri, results)
    with _our_warnings() as messages:
        for protocol in config.protocols:  # checked up front; the experiments exist before workers race to create them
            prepare_dataset(protocol, results / "cache", progress)
            tracker = Tracker(uri, protocol.name, results / "mlartifacts" if uri.startswith("sqlite:") else None)
            for stale in tracker.close_stale_runs():
                echo(stale_message(stale))
    shown = set(messages)
    for message in messages:
        echo(f"Warning: {message}")
    if left_out(config):
        echo(f"Left out, the method adapting networks of other dimensions or norms only: {', '.join(left_out(config))}")
    cells = grid(config)
    todo, outcomes = sort_out(cells, config, MlflowClient(tracking_uri=uri))
    skipped = sum(o.status == "skipped" for o in outcomes)
    if skipped:
        echo(f"{skipped} of {len(cells)} cell(s) already finished in {uri}: skipped")
    changed = [c for c in todo if c.data_changed]
    if changed:
        echo(f"{len(changed)} cell(s) finished before on other data (a file's contents or the split changed since): "
             f"running again: {', '.join(c.name for c in changed)}")
    for o in outcomes:
        if o.status == "running":
            echo(f"{o.cell.name}: {o.error}; left alone")
    start = time.perf_counter()
    sources = list({_source_of(engine_of(c, config)): c for c in todo}.values())
    def show(outcome: Outcome, bar: tqdm) -> None:
        for message in (m for m in outcome.warnings if m not in shown):
            shown.add(message)
            bar.write(f"Warning: {message}")
        if outcome.status == "failed":
            bar.write(f"{outcome.cell.name}: FAILED: {outcome.error}")

    training_progress = progress and config.workers <= 1 and config.executor == "local"
    with progress_bar(total=len(sources), desc="source models", unit="model",
                      disable=not progress or not sources) as bar:
        tasks = [(c, config, training_progress) for c in sources]
        for outcome in execute(warm_source, tasks, config.workers, config.executor):
            show(outcome, bar)
            bar.update()
    prepare_seconds = time.perf_counter() - start
    with progress_bar(total=len(todo), desc="cells", unit="cell", disable=not progress or not todo) as bar:
        for outcome in execute(run_cell, [(c, config) for c in todo], config.workers, config.executor):
            outcomes.append(outcome)
            show(outcome, bar)
            bar.update()
    order = {c.key: i for i, c in enumerate(cells)}
    outcomes.sort(key=lambda o: order[o.cell.key])
    return BenchResult(outcomes, prepare_seconds, time.perf_counter() - start - prepare_seconds, uri, results)


def _source_of(engine: Engine) -> tuple:
    """What identifies the source model a cell adapts (cells sharing it share its unadapted predictions)."""
    c = engine.config
    return (engine.protocol.name, engine.architecture_name, c.seed, repr(sorted(c.arch_config.items())),
            engine.protocol.training)


def summary_table(result: BenchResult, metric: str = "dice_recovery", title: str = "recovery") -> str:
    """Dice recovery (or another parent-run `metric`, named `title`) per method and swept configuration (rows) and
    protocol (columns, with the setting when several ran): the mean over seeds of each cell's mean over target
    sites, ± their std with several seeds; `failed` where a cell failed."""
    columns = list(dict.fromkeys((o.cell.protocol.name, o.cell.setting) for o in result.outcomes))
    both = len({setting for _, setting in columns}) > 1
    methods = list(dict.fromkeys((o.cell.method, o.cell.config) for o in result.outcomes))
    rows = []
    for method, swept in methods:
        row = [method + (" [" + ",".join(f"{k}={v}" for k, v in swept) + "]" if swept else "")]
        for protocol, setting in columns:
            mine = [o for o in result.outcomes if (o.cell.method, o.cell.config, o.cell.protocol.name, o.cell.setting)
                    == (method, swept, protocol, setting)]
            values = [o.metrics.get(metric, math.nan) for o in mine if o.status in ("finished", "skipped")]
            failed = sum(o.status == "failed" for o in mine)
            row.append(_mean_std(values) + (f" ({failed} failed)" if failed else ""))
        rows.append(row)
    header = [title, *(f"{p} {s}" if both else p for p, s in columns)]
    return format_table(header, rows)


def _mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a" if values else "-"
    text = f"{statistics.fmean(finite):.3f}"
    return text + (f" ± {statistics.stdev(finite):.3f}" if len(finite) > 1 else "")
