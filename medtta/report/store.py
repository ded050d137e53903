"""What a benchmark report reads: the finished parent runs of `medtta run` / `medtta bench` in an MLflow store, with
their per-site child runs and per-case tables. Nothing is re-run."""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from medtta.errors import MedttaError
from medtta.stats import PARADIGMS

PREFIX = "medtta/"
SITE_EVAL_PREFIX = "medtta/site-"  # `medtta site-eval` stores: not benchmark cells
PARADIGM_ORDER = {p: k for k, p in enumerate(("none", *PARADIGMS))}  # how tables list methods
CASES = "cases.json"
SLICES = "slices"
SOURCE_ROLE = "source"  # `medtta.site_role` of the source-site check's child run (`medtta.engine.SOURCE`)
# params that do not change what a cell measures: runs differing only in these are the same method variant (the
# source-site check adds a site but leaves the target sites' numbers as they are)
NOT_VARIANT = frozenset({"method", "setting", "seed", "device", "target_sites", "in_domain_cases",
                         "source_site_check"})
#: params added after runs were logged without them, at the value those runs had
ADDED_PARAMS = {"precision": "fp32", "arch.source_aug": "none"}


@dataclass
class SiteRun:
    """A child run: one target site of a cell (or its source site, in the source-site check), with its per-case rows
    and its qualitative slices (artifact paths)."""

    run_id: str
    site: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    slices: list[str] = field(default_factory=list)
    role: str = "target"  # runs logged before site roles existed are target sites


@dataclass
class Cell:
    """A finished parent run: one method on one protocol with one seed and setting."""

    run_id: str
    experiment: str
    protocol: str
    modality: str
    method: str
    paradigm: str
    architecture: str
    setting: str
    seed: int
    params: dict[str, str]
    metrics: dict[str, float]
    start_time: int
    sites: list[SiteRun]  # the target sites: what every recovery and site aggregate is over
    label: str = ""  # the method as the report names it (see `label_variants`)
    config: str = "default"  # `medtta.config`: the hyper-parameters and steps that differ from the method's defaults
    source_site: SiteRun | None = None  # the source-site check, when the run made it

    @property
    def variant(self) -> tuple:
        """What distinguishes this method's configuration from another run of the same method."""
        return (self.method, self.setting, tuple(sorted((k, v) for k, v in self.all_params.items()
                                                        if k not in NOT_VARIANT)))

    @property
    def all_params(self) -> dict[str, str]:
        return {**ADDED_PARAMS, **self.params}


@dataclass
class Store:
    """The cells a report covers and what was left out."""

    uri: str
    experiments: list[str]
    cells: list[Cell]
    unfinished: int = 0  # parent runs not FINISHED (running, failed or killed)
    duplicates: int = 0  # older finished runs of a cell that was run again
    client: Any = None  # the MlflowClient that read it

    def download(self, run_id: str, path: str, dst: Path) -> Path:
        """An artifact of a run, downloaded under `dst`."""
        return download(self.client, run_id, path, dst)


def download(client: Any, run_id: str, path: str, dst: Path) -> Path:
    """An artifact of a run, downloaded under `dst` without MLflow's progress bar (one per run would bury the
    report's own lines)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def check_store(uri: str) -> None:
    """A SQLite store must exist: reading must not create an empty database."""
    if uri.startswith("sqlite:///"):
        path = Path(unquote(uri.removeprefix("sqlite:///")))
        if not path.is_file():
            raise MedttaError(f"no MLflow store at {path}: run `medtta run` or `medtta bench` with these --results "
                              "first, or pass --tracking-uri")


def matching_experiments(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The benchmark experiments (`medtta/<protocol>`, not `medtta/site-*`) whose name, or name without `medtta/`,
    matches one of the fnmatch `patterns`."""
    benchmark = [n for n in names if n.startswith(PREFIX) and not n.startswith(SITE_EVAL_PREFIX)]
    return [n for n in benchmark if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n[len(PREFIX):], p)
                                        for p in patterns)]


def read_store(uri: str, patterns: Sequence[str] = ("medtta/*",),
               echo: Callable[[str], None] = lambda _: None) -> Store:
    """Every finished cell of the experiments matching `patterns` (the latest run of a cell run more than once), by
    protocol, then no adaptation first and the paradigms in MedSeg-TTA's order.

    Raises:
        MedttaError: no store at a SQLite URI, no experiment matching, or no finished run in them.
    """
    check_store(uri)
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    found = {e.name: e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)}
    names = matching_experiments(sorted(found), patterns)
    if not names:
        available = ", ".join(n for n in sorted(found) if n.startswith(PREFIX) and not n.startswith(SITE_EVAL_PREFIX))
        raise MedttaError(f"no benchmark experiment in {uri} matches --experiment {' '.join(patterns)} "
                          f"(available: {available or 'none: run `medtta run` or `medtta bench` first'})")
    runs = list(all_runs(client, [found[n] for n in names]))
    by_experiment = {found[n]: n for n in names}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "medtta.method" in r.data.tags]
    finished = [r for r in parents if r.info.status == "FINISHED"]
    children: dict[str, list] = {}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED":
            children.setdefault(r.data.tags["mlflow.parentRunId"], []).append(r)
    if not finished:
        raise MedttaError(f"no finished run in {', '.join(names)} of {uri} ({len(parents) - len(finished)} "
                          "unfinished): nothing to report yet")
    echo(f"Reading {len(finished)} finished run(s) from {', '.join(names)} in {uri}")
    with tempfile.TemporaryDirectory(prefix="medtta-report-") as tmp:
        cells = [_cell(client, r, by_experiment[r.info.experiment_id], children.get(r.info.run_id, []), Path(tmp))
                 for r in finished]
    latest: dict[tuple, Cell] = {}
    for cell in sorted(cells, key=lambda c: c.start_time):
        latest[(cell.protocol, cell.variant, cell.seed)] = cell
    kept = list(latest.values())
    label_variants(kept)
    kept.sort(key=lambda c: (c.protocol, PARADIGM_ORDER.get(c.paradigm, len(PARADIGM_ORDER)), c.label, c.seed))
    return Store(uri, names, kept, len(parents) - len(finished), len(cells) - len(kept), client)


def all_runs(client: Any, experiment_ids: list[str], filter_string: str = "") -> Iterator[Any]:
    """Every run of the experiments matching `filter_string`, a page of MLflow's search at a time."""
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def site_runs(client: Any, run: Any) -> list[SiteRun]:
    """The finished child runs of a parent `run`, with their case rows, in the order they ran."""
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and "
                                  "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])
    with tempfile.TemporaryDirectory(prefix="medtta-run-") as tmp:
        return [_site_run(client, child, Path(tmp)) for child in children]


def _cell(client: Any, run: Any, experiment: str, children: list, tmp: Path) -> Cell:
    tags, info = run.data.tags, run.info
    sites = [s for s in (_site_run(client, child, tmp) for child in sorted(children, key=lambda c: c.info.start_time))
             if s.rows]
    source = [s for s in sites if s.role == SOURCE_ROLE]
    return Cell(run_id=info.run_id, experiment=experiment,
                protocol=tags.get("medtta.protocol", experiment[len(PREFIX):]),
                modality=tags.get("medtta.modality", "?"), method=tags["medtta.method"],
                paradigm=tags.get("medtta.paradigm", "none"), architecture=tags.get("medtta.architecture", "?"),
                setting=tags.get("medtta.setting", "?"), seed=int(tags.get("medtta.seed", 0)),
                params=dict(run.data.params), metrics=dict(run.data.metrics), start_time=info.start_time or 0,
                sites=[s for s in sites if s.role != SOURCE_ROLE], source_site=source[-1] if source else None,
                config=tags.get("medtta.config") or _config_of(tags["medtta.method"], dict(run.data.params)))


def _config_of(method: str, params: dict[str, str]) -> str:
    """`medtta.config` of a run logged before the tag existed, from its params."""
    from medtta.registry import ADAPTERS

    try:
        cls = ADAPTERS.get(method)
    except MedttaError:  # a plugin no longer installed
        return "?"
    hparams = {k.removeprefix("hp."): v for k, v in params.items() if k.startswith("hp.")}
    return cls.config_tag(hparams, params.get("steps", cls.default_steps))


def _site_run(client: Any, run: Any, tmp: Path) -> SiteRun:
    run_id = run.info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    rows = []
    if CASES in names:
        table = json.loads(download(client, run_id, CASES, tmp / run_id).read_text())
        rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    slices = ([a.path for a in client.list_artifacts(run_id, SLICES) if a.path.endswith(".npz")]
              if SLICES in names else [])
    tags = run.data.tags
    return SiteRun(run_id, tags.get("medtta.site", run.info.run_name), dict(run.data.metrics), rows, slices,
                   tags.get("medtta.site_role", "target"))


def label_variants(cells: list[Cell]) -> None:
    """Name each cell's method for the tables: the method, its setting when the cells mix settings, and the
    parameters that tell its variants apart when one method was run with several configurations on a protocol
    (not those that differ between protocols, such as their training schedules: a method keeps one name across
    modalities)."""
    several_settings = len({c.setting for c in cells}) > 1
    variants: dict[tuple, set] = {}
    for c in cells:
        variants.setdefault((c.method, c.setting, c.protocol), set()).add(c.variant[2])
    for c in cells:
        label = c.method + (f" ({c.setting})" if several_settings else "")
        configs = variants[(c.method, c.setting, c.protocol)]
        if len(configs) > 1:
            differing = sorted({k for config in configs for k, v in config if not all((k, v) in o for o in configs)})
            label += " [" + ", ".join(f"{k}={c.all_params.get(k, '-')}" for k in differing) + "]"
        c.label = label

