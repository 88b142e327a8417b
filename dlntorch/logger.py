"""What a run writes: TensorBoard events, trajectory.npz, summary.json — and the time grid.

TensorBoard (see docs/tensorboard.md) gets a custom-scalars layout that opens on the headline
charts (the median of energy, effective rank, balancedness and each singular value in its q10–q90
band), scalars of the headline observables (`name/median`, `q10`, `q90`, `mean` over live
replicas and the first few replicas `name/replica_i`; run.tb_tags=all: every observable with
min and max too; stochastic runs: also `name/ci95_low`, `name/ci95_high`, the 95 % band of the
mean, and the balance, drift, entropy and free energy as headline observables), histograms of the
per-replica values at a bounded number of logged times (`distribution/name`) and at the end
(`final/name`), and hparams.
trajectory.npz gets every observable as an array (T, B[, k]) — analysis reads that, not events
(written by trajectory.py and npzfile.py).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import compat

AGGREGATES = ("mean", "median", "min", "max", "q10", "q90")
HEADLINE_AGGREGATES = ("median", "q10", "q90", "mean")     # what run.tb_tags=headline logs
# the observables TensorBoard shows by default: what the custom-scalars charts need
HEADLINE = re.compile(r"energy|effective_rank|balancedness(_\d+)?|sigma_\d+|test_error|w\d+(_\d+)?"
                      r"|sharpness|singular_hits")
# stochastic runs show these too (balance, the product's drift, entropy and free energy), and every
# observable shown with its mean gets the 95 % confidence band of that mean over replicas
STOCHASTIC_HEADLINE = re.compile(r"balance_gap|product_drift|entropy|free_energy")
BAND = ("ci95_low", "ci95_high")
Z95 = 1.959963984540054          # the standard normal's 97.5 % quantile
# and the conservation check: ‖G(t) − G(0)‖ is 0 under gradient flow, so its largest value over
# the replicas says how far the steps have taken the run from it (its max alone, no replicas)
CONSERVATION = "balancedness_drift"
# the edge of stability (run.sharpness_iterations ≥ 1): λ_max beside 2/lr, the stability limit of a
# step of size lr (one value for every replica: its max alone), in one chart
SHARPNESS, STABILITY_LIMIT = "sharpness", "stability_limit"
DISTRIBUTIONS = ("energy", "effective_rank", "balancedness", "sigma_1", "sigma_2")   # over time
NOT_OBSERVABLES = ("step", "t", "diverged")


def log_steps(total_steps: int, points: int) -> np.ndarray:
    """At most `points` distinct steps in [0, total]: half evenly spaced (late dynamics) and half
    log-spaced from step 1 (rank dynamics span decades of t); always 0 and the last step."""
    if total_steps + 1 <= points:
        return np.arange(total_steps + 1)
    half = max(points // 2, 1)
    even = np.linspace(0, total_steps, half)
    logs = np.geomspace(1, total_steps, points - half)
    steps = np.unique(np.concatenate([[0, total_steps], np.rint(even), np.rint(logs)]).astype(np.int64))
    return steps


def histogram_steps(grid: np.ndarray, points: int) -> np.ndarray:
    """The logged steps that get distribution histograms: at most `points`, evenly spread over
    the log grid's entries (so over early and late times alike), fixed in advance by the config,
    so that a resumed run picks the same ones."""
    if points <= 0:
        return np.zeros(0, dtype=np.int64)
    picks = np.unique(np.rint(np.linspace(0, len(grid) - 1, min(points, len(grid)))).astype(np.int64))
    return np.asarray(grid)[picks]


def atomic_write_bytes(path: Path, write, before_rename: Callable[[], Any] | None = None) -> None:
    """Write through a temporary file in the same folder, then rename: a reader (or a crash)
    never sees a half-written file, and the previous version survives until the rename.
    `before_rename`: called once the temporary file is on disk, before it takes the name (what the
    file must not appear before, e.g. the final checkpoint; if it raises, nothing is renamed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; results are for collaborators too
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Mapping[str, Any], before_rename: Callable[[], Any] | None = None) -> None:
    """`data` as indented JSON, encoded as it is written: each list of numbers (a per-replica
    column, nested or not) goes through json's C encoder on one line (its indented encoder is pure
    Python: ~1 s for the summary of 4096 replicas, one number a line), one list at a time, so that
    the text of a summary at a million replicas (gigabytes) is never held whole in memory."""
    skeleton, leaves, marker = json_skeleton(data)
    text = json.dumps(skeleton, indent=2, default=_jsonable, allow_nan=True)
    pieces = re.split(f'"{marker}(\\d+)"', text)      # text, leaf index, text, …

    def write(handle) -> None:
        for k, piece in enumerate(pieces):
            for text in (json_leaf(leaves[int(piece)]) if k % 2 else [piece]):
                handle.write(text.encode())
    atomic_write_bytes(path, write, before_rename)


JSON_BLOCK = 1 << 16        # an array leaf's rows that are Python numbers (and text) at once


def json_leaf(leaf: Any):
    """The JSON text of one numeric leaf, in pieces: an array EXACTLY as json.dumps(leaf.tolist())
    writes it, JSON_BLOCK rows at a time (the list of a million Python floats costs 32 MB, the
    array 8 MB), so that a huge per-replica column never exists as Python numbers whole."""
    if not isinstance(leaf, np.ndarray):
        yield json.dumps(leaf, default=_jsonable, allow_nan=True)
        return
    if len(leaf) == 0:
        yield "[]"
        return
    yield "["
    for start in range(0, len(leaf), JSON_BLOCK):
        text = json.dumps(leaf[start:start + JSON_BLOCK].tolist(), allow_nan=True)
        yield (", " if start else "") + text[1:-1]       # the block's items, without its brackets
    yield "]"


_NUMBERS = (bool, int, float, np.generic, type(None))


def json_skeleton(data: Mapping[str, Any]) -> tuple[Any, list, str]:
    """`data` with each numeric list (or array) replaced by a marker string naming its index in
    `leaves`, which keeps the values themselves (not their text)."""
    marker = f"@@{uuid.uuid4().hex}@@"
    leaves: list = []

    def numeric(values: list | tuple) -> bool:       # numbers, or lists of them, all the way down
        return all(isinstance(x, _NUMBERS) or (isinstance(x, (list, tuple)) and numeric(x)) for x in values)

    def leaf(value: Any) -> str:
        leaves.append(value)
        return f"{marker}{len(leaves) - 1}"

    def skeleton(value: Any) -> Any:
        if isinstance(value, (np.ndarray, Tensor)) and value.ndim > 0:   # written in blocks (json_leaf)
            return leaf(value.detach().cpu().numpy() if isinstance(value, Tensor) else value)
        if isinstance(value, (np.ndarray, Tensor)):
            value = _jsonable(value)
        if isinstance(value, Mapping):
            return {k: skeleton(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return leaf(value) if value and numeric(value) else [skeleton(x) for x in value]
        return value

    return skeleton(data), leaves, marker


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.ndarray, Tensor)):
        return np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def aggregate_rows(values: np.ndarray, ordered: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """mean, median, min, max, q10, q90 of every row of (K, B), NaN entries (diverged replicas)
    left out; NaN for a row with none. Quantiles interpolate linearly (numpy's default), from one
    sort of the whole array: np.nanquantile works row by row and costs milliseconds per call.
    `ordered`: a float64 array of the same shape to sort into (else a new one)."""
    values = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(values)
    n = valid.sum(1)
    last = np.maximum(n - 1, 0)
    if ordered is None:
        ordered = np.empty_like(values)
    np.copyto(ordered, values)
    ordered.sort(axis=1)                               # NaN sorts last
    rows = np.arange(values.shape[0])

    def quantile(q: float) -> np.ndarray:
        position = q * last
        low = np.floor(position).astype(np.int64)
        a, b = ordered[rows, low], ordered[rows, np.minimum(low + 1, last)]
        return np.where(n > 0, a + (b - a) * (position - low), np.nan)

    with np.errstate(invalid="ignore", divide="ignore"):
        live = values if n.min(initial=values.shape[1]) == values.shape[1] else np.where(valid, values, 0.0)
        return {"mean": np.where(n > 0, live.sum(1) / n, np.nan),
                "median": quantile(0.5),
                "min": np.where(n > 0, ordered[:, 0], np.nan),
                "max": np.where(n > 0, ordered[rows, last], np.nan),
                "q10": quantile(0.1), "q90": quantile(0.9)}


def band_rows(values: np.ndarray, mean: np.ndarray) -> dict[str, np.ndarray]:
    """The 95 % confidence band of each row's mean over its replicas (K, B), NaN entries left out:
    mean ± Z95 · s/√n with s the sample standard deviation (ddof 1) of the n live values; NaN for a
    row with fewer than two. `mean` is aggregate_rows' (the band costs one more pass, no sort)."""
    values = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(values)
    n = valid.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        squares = np.where(valid, values - mean[:, None], 0.0) ** 2
        half = np.where(n > 1, Z95 * np.sqrt(squares.sum(1) / (n - 1) / n), np.nan)
    return {"ci95_low": mean - half, "ci95_high": mean + half}


def aggregate(values: np.ndarray, band: bool = False) -> dict[str, float]:
    """The aggregates of one observable over replicas, as floats (see aggregate_rows); `band`:
    with the 95 % confidence band of the mean too (band_rows)."""
    rows = aggregate_rows(np.asarray(values, dtype=np.float64)[None])
    if band:
        rows.update(band_rows(np.asarray(values, dtype=np.float64)[None], rows["mean"]))
    return {k: float(v[0]) for k, v in rows.items()}


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C, in C (google-crc32c). TensorBoard without TensorFlow computes it
    in pure Python, ~90 µs per KB: that, not the logging itself, was most of the time a logged
    point cost. Same value (tests/test_logger.py checks it against TensorBoard's)."""
    import google_crc32c
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def scalar_names(row: Mapping[str, np.ndarray]) -> list[str]:
    """The scalar observables of a logged row (one value per replica), in the order observed."""
    return [k for k, v in row.items() if v.ndim == 1 and k not in NOT_OBSERVABLES]


def layout(names: Sequence[str], replicas_shown: int, banded: Sequence[str] = ()) -> dict[str, dict[str, list]]:
    """The custom-scalars layout (TensorBoard's CUSTOM SCALARS tab), in the order the tab shows it:
    the headline margin charts (median in its q10–q90 band) of energy, effective rank,
    balancedness and the singular values; for stochastic runs, the mean of each `banded`
    observable in its 95 % confidence band; balancedness per junction; single replicas; the other
    observables; checks (time, divergences, the conservation of G). One kind of chart per category
    (see _as_shown)."""
    def index(name: str) -> int:
        return int(name.rsplit("_", 1)[1])

    def margins(chosen: Sequence[str]) -> dict[str, list]:
        return {f"{n} (median, q10–q90)": ["Margin", [f"{n}/median", f"{n}/q10", f"{n}/q90"]] for n in chosen}

    sigmas = sorted((n for n in names if re.fullmatch(r"sigma_\d+", n)), key=index)
    junctions = sorted((n for n in names if re.fullmatch(r"balancedness_\d+", n)), key=index)
    headline = [n for n in ("energy", "effective_rank", "balancedness", *sigmas) if n in names]
    replicas = [n for n in ("energy", "effective_rank") if n in names] if replicas_shown else []
    categories = {
        "headline": margins(headline),
        "95 % bands of the mean over replicas": {
            f"{n} (mean, 95 % band)": ["Margin", [f"{n}/mean", f"{n}/{BAND[0]}", f"{n}/{BAND[1]}"]] for n in banded},
        "balancedness per junction": margins(junctions),
        "replicas": {f"{n} of replicas 0–{replicas_shown - 1}": ["Multiline", [rf"^{n}/replica_\d+$"]]
                     for n in replicas},
        "edge of stability": {"sharpness λ_max (median, q10, q90) and 2/lr": ["Multiline", [
            f"^{SHARPNESS}/(median|q10|q90)$", f"^{STABILITY_LIMIT}/max$"]]} if SHARPNESS in names else {},
        "other observables": margins([n for n in names if n not in (*headline, *junctions, CONSERVATION,
                                                                     SHARPNESS, STABILITY_LIMIT)]),
        "checks": {"time t": ["Multiline", ["^time/t$"]],
                   "diverged replicas": ["Multiline", ["^diverged/count$"]],
                   **({f"{CONSERVATION} (max)": ["Multiline", [f"^{CONSERVATION}/max$"]]}
                      if CONSERVATION in names else {})},
    }
    return {title: _as_shown(charts) for title, charts in categories.items() if charts}


def _as_shown(charts: dict[str, list]) -> dict[str, list]:
    # TensorBoard's CUSTOM SCALARS tab (2.x, seen in a browser) shows a category's margin charts
    # last first and its multiline charts in order (mixed, multiline first): margin charts are
    # written reversed, so that each category reads in the order given
    return dict(reversed(charts.items())) if all(kind == "Margin" for kind, _ in charts.values()) else charts


def _metrics_named_short(experiment: Any) -> Any:
    """The experiment summary with each metric's column headed by its name without `hparam/`:
    narrower columns, so a sweep's swept keys and every headline metric fit 1600 px."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    metadata = experiment.value[0].metadata
    data = HParamsPluginData.FromString(metadata.plugin_data.content)
    for info in data.experiment.metric_infos:
        info.display_name = info.name.tag.removeprefix("hparam/")
    metadata.plugin_data.content = data.SerializeToString()
    return experiment


class TensorBoardLog:
    """TensorBoard events under `tb/`. Resuming purges events past the checkpoint's step.

    `tags`: "headline" (the observables HEADLINE matches, HEADLINE_AGGREGATES of each and single
    replicas, and the max of CONSERVATION) or "all" (every observable, all AGGREGATES);
    `histogram_steps`: the logged steps that also get distribution/<name> histograms; `bands`
    (stochastic runs): STOCHASTIC_HEADLINE's observables are headline too, and every observable
    logged with its mean also gets its 95 % band (`name/ci95_low`, `name/ci95_high`)."""

    def __init__(self, log_dir: Path, replicas_shown: int, purge_step: int | None = None,
                 tags: str = "headline", histogram_steps: Sequence[int] = (), bands: bool = False):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: do it lazily

        compat.install_event_checksums(masked_crc32c)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.replicas_shown = replicas_shown
        self.tags = tags
        self.bands = bands
        self.histogram_steps = {int(s) for s in histogram_steps}
        self.layout_written = purge_step is not None   # a resumed run's first events file has it
        self._scratch: dict[str, np.ndarray] = {}
        # add_histogram's own bins="tensorflow" edges, as one array: given as the list it keeps,
        # np.histogram converts ~1500 floats on every call (a third of a 2x2 run's histogram time)
        self.bins = np.asarray(self.writer.default_bins)

    def aggregates(self, name: str) -> tuple[str, ...]:
        """The aggregates of observable `name` that TensorBoard gets; none: no tags at all
        (trajectory.npz keeps every observable)."""
        if self.tags == "all":
            chosen = AGGREGATES
        elif HEADLINE.fullmatch(name) or (self.bands and STOCHASTIC_HEADLINE.fullmatch(name)):
            chosen = HEADLINE_AGGREGATES
        else:
            return ("max",) if name in (CONSERVATION, STABILITY_LIMIT) else ()
        return chosen + BAND if self.bands else chosen

    def shown(self, name: str) -> bool:
        return bool(self.aggregates(name))

    def scratch(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 array of `shape` kept between calls: the aggregates of 8 rows of 4096 replicas
        need 6.5 MB twice, and fresh pages cost more page faults than the sort costs."""
        size = math.prod(shape)
        if self._scratch.get(name, np.empty(0)).size < size:
            self._scratch[name] = np.empty(size)
        return self._scratch[name][:size].reshape(shape)

    def scalars(self, rows: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Logged rows (each with its `step`, `t` and `diverged`) to TensorBoard: the aggregates
        of all rows from one sort, and every tag of a row as ONE Summary record (~250
        add_scalar calls, each a record of its own, would cost milliseconds per row)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        names = [k for k in scalar_names(rows[0]) if self.shown(k)]
        aggregates = [self.aggregates(name) for name in names]
        with_replicas = [len(chosen) > 1 for chosen in aggregates]     # not CONSERVATION's max alone
        K, n, B = len(rows), len(names), len(rows[0]["diverged"])
        values = self.scratch("values", (K, n, B))
        for k, row in enumerate(rows):
            for i, name in enumerate(names):
                values[k, i] = row[name]
        dead = np.stack([row["diverged"] > 0 for row in rows])[:, None, :]
        live_values = (np.where(dead, np.nan, values) if dead.any() else values).reshape(K * n, B)
        stats = aggregate_rows(live_values, ordered=self.scratch("ordered", (K * n, B)))
        if self.bands:
            stats.update(band_rows(live_values, stats["mean"]))
        stats = {a: v.reshape(K, n) for a, v in stats.items()}
        shown = min(self.replicas_shown, B)
        if not self.layout_written:
            banded = [name for name, chosen in zip(names, aggregates) if BAND[0] in chosen]
            self.writer.add_custom_scalars(layout(names, shown, banded))
            self.layout_written = True
        records = compat.file_writer(self.writer)    # add_scalar's own writer, where it can be reached
        for k, row in enumerate(rows):
            tags = {"time/t": float(row["t"]), "diverged/count": float(dead[k].sum())}
            for i, name in enumerate(names):
                tags.update({f"{name}/{agg}": stats[agg][k, i] for agg in aggregates[i]})
                if with_replicas[i]:
                    tags.update({f"{name}/replica_{r}": values[k, i, r] for r in range(shown)})
            if records is None:
                for tag, v in tags.items():
                    self.writer.add_scalar(tag, float(v), int(row["step"]))
            else:
                summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in tags.items()])
                records.add_summary(summary, int(row["step"]))
            if int(row["step"]) in self.histogram_steps:
                self.histograms(int(row["step"]), row, row["diverged"] > 0, "distribution",
                                [d for d in DISTRIBUTIONS if d in row])

    def histograms(self, step: int, row: Mapping[str, np.ndarray], diverged: np.ndarray,
                   prefix: str = "final", names: Sequence[str] | None = None) -> None:
        """Histograms `prefix/name` of the per-replica values at `step` (the shown observables by
        default), diverged and non-finite values left out."""
        for name in names if names is not None else [k for k in scalar_names(row) if self.shown(k)]:
            values = row[name]
            finite = values[np.isfinite(values) & ~diverged]
            if finite.size:
                # a replica on its way out (E ~ 1e200, not yet inf) overflows the histogram's sum of
                # squares, which TensorBoard then stores as inf: harmless, the buckets stay right
                with np.errstate(over="ignore"):
                    try:
                        self.writer.add_histogram(f"{prefix}/{name}", finite, step, bins=self.bins)
                    except ValueError:
                        # values all equal and huge (one replica at 1e29 on its way out): the
                        # writer's bins v ± 0.5 round to zero width and it raises "empty"; such
                        # a histogram says nothing, and the run must not fail at its end over it
                        pass

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        """The HPARAMS tab's row of this run: its columns `hparams` and its final `metrics`
        (tags hparam/<metric>). The experiment summary names exactly the columns given:
        TensorBoard takes the first one it finds as the column list of every run under the
        logdir, so each job of a sweep writes the same (its swept keys, report.hparams)."""
        from torch.utils.tensorboard.summary import hparams as hparams_protos

        tagged = {f"hparam/{k}": v for k, v in metrics.items()}
        # in this run's own events file (not add_hparams' extra sub-run): the HPARAMS tab shows
        # one row per run next to its scalars; at the final step, so a resumed run's purge covers them
        experiment, start, end = hparams_protos(dict(hparams), tagged)
        for proto in (_metrics_named_short(experiment), start, end):
            self.writer.file_writer.add_summary(proto, step)
        for tag, value in tagged.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


def to_numpy(observables: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """One device→host transfer per logged time."""
    return {k: v.detach().to("cpu", torch.float64).numpy() for k, v in observables.items()}
