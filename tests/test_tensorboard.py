"""TensorBoard as the lab's users read it, read back with TensorBoard's own reader: the
custom-scalars layout, the default (headline) tag set, histograms over time, HPARAMS of a sweep
(only the swept keys); and the state a researcher needs in trajectory.npz (product, factors,
G_p, chosen entries w_ij)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import histogram as tb_histogram

from dlntorch.analysis import load_run
from dlntorch.config import ConfigError
from dlntorch.logger import histogram_steps, log_steps
from dlntorch.network import chain
from dlntorch.train import run

TINY = ["replicas=6", "run.steps=300", "run.log_points=20"]


def events(run_dir) -> EventAccumulator:
    reader = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    reader.Reload()
    return reader


def layout_of(reader: EventAccumulator) -> layout_pb2.Layout:
    """The layout in the order the CUSTOM SCALARS tab shows it (a category of margin charts last
    first, one of multiline charts in order: dlntorch.logger._as_shown)."""
    (record,) = reader.Tensors("custom_scalars__config__")      # written once, at the run's start
    layout = layout_pb2.Layout.FromString(record.tensor_proto.string_val[0])
    for category in layout.category:
        kinds = {chart.WhichOneof("content") for chart in category.chart}
        assert len(kinds) == 1, category.title                  # one kind of chart per category
        if kinds == {"margin"}:
            charts = list(category.chart)[::-1]
            del category.chart[:]
            category.chart.extend(charts)
    return layout


def hparams_of(reader: EventAccumulator, which: str) -> plugin_data_pb2.HParamsPluginData:
    return plugin_data_pb2.HParamsPluginData.FromString(reader.PluginTagToContent("hparams")[f"_hparams_/{which}"])


def test_the_layout_opens_on_the_headline_margin_charts_of_tags_the_run_wrote(make_cfg, tmp_path):
    run(make_cfg(*TINY, "model.depth=3", "task=completion", "task.size=3", "task.observations=6"))
    reader = events(tmp_path / "run")
    layout, tags = layout_of(reader), set(reader.Tags()["scalars"])
    titles = [c.title for c in layout.category]
    assert titles == ["headline", "balancedness per junction", "replicas", "other observables", "checks"]
    headline = [chart.margin.series[0].value for chart in layout.category[0].chart]
    assert headline == ["energy/median", "effective_rank/median", "balancedness/median",
                        "sigma_1/median", "sigma_2/median", "sigma_3/median"]       # k = min(m, n) = 3 < 8
    junctions = [chart.margin.series[0].value for chart in layout.category[1].chart]
    assert junctions == ["balancedness_1/median", "balancedness_2/median"]         # depth 3: two junctions
    for category in layout.category:
        for chart in category.chart:
            if chart.WhichOneof("content") == "margin":
                (series,) = chart.margin.series
                name = series.value.split("/")[0]
                assert (series.value, series.lower, series.upper) == (f"{name}/median", f"{name}/q10", f"{name}/q90")
                assert {series.value, series.lower, series.upper} <= tags, chart.title   # no empty chart
    replicas = [chart.multiline.tag[0] for chart in layout.category[2].chart]
    assert replicas == [r"^energy/replica_\d+$", r"^effective_rank/replica_\d+$"]
    others = [chart.margin.series[0].value for chart in layout.category[3].chart]
    assert "test_error/median" in others
    assert [chart.multiline.tag[0] for chart in layout.category[4].chart] == [
        "^time/t$", "^diverged/count$", "^balancedness_drift/max$"]
    assert {"time/t", "diverged/count", "balancedness_drift/max"} <= tags


def test_the_default_tags_are_the_headline_ones_and_all_restores_every_aggregate(make_cfg, tmp_path):
    run(make_cfg(*TINY, "model.depth=3"))
    run(make_cfg(*TINY, "model.depth=3", "run.tb_tags=all", out="all"))
    headline, every = set(events(tmp_path / "run").Tags()["scalars"]), set(events(tmp_path / "all").Tags()["scalars"])
    observed = ("energy", "effective_rank", "balancedness", "balancedness_1", "balancedness_2", "sigma_1", "sigma_2",
                "w12", "w21")
    expected = {"time/t", "diverged/count"} | {f"{n}/{a}" for n in observed for a in ("median", "q10", "q90", "mean")} \
        | {f"{n}/replica_{r}" for n in observed for r in range(4)} | {"balancedness_drift/max"}
    assert headline - {t for t in headline if t.startswith("hparam/")} == expected
    # trajectory.npz keeps every observable whatever TensorBoard shows
    assert load_run(tmp_path / "run").observables == load_run(tmp_path / "all").observables
    assert {"balance_gap/min", "balance_gap/max", "energy/max", "stable_rank/q90", "sigma_max/median"} <= every
    assert headline < every


def test_distributions_at_the_chosen_logged_times_hold_the_live_replicas_values(make_cfg, tmp_path):
    run(make_cfg(*TINY, "run.histogram_points=5"))
    reader, saved = events(tmp_path / "run"), load_run(tmp_path / "run")
    chosen = histogram_steps(log_steps(300, 20), 5)
    assert len(chosen) == 5 and chosen[0] == 0 and chosen[-1] == 300
    for name in ("energy", "effective_rank", "balancedness", "sigma_1", "sigma_2"):
        records = reader.Histograms(f"distribution/{name}")
        assert [r.step for r in records] == chosen.tolist()
        for record in records:
            values = saved.series(name)[list(saved.step).index(record.step)]
            histogram = record.histogram_value
            assert histogram.num == len(values)
            assert (histogram.min, histogram.max) == (values.min(), values.max())
            assert histogram.sum == pytest.approx(values.sum(), rel=1e-12)   # float64 summation order
            # the buckets are add_histogram's default ones (bins="tensorflow"), given as an array
            default = tb_histogram(name, values, tf_bins()).value[0].histo
            assert list(histogram.bucket_limit) == list(default.bucket_limit)
            assert list(histogram.bucket) == list(default.bucket)
    assert [r.step for r in reader.Histograms("final/energy")] == [300]


def tf_bins() -> list[float]:
    """SummaryWriter's default_bins (bins="tensorflow"), from a writer of its own."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        writer = SummaryWriter(folder)
        writer.close()
        return writer.default_bins


def test_histogram_steps_are_spread_over_the_grid_and_fixed_by_it():
    grid = log_steps(20000, 200)
    chosen = histogram_steps(grid, 32)
    assert len(chosen) == 32 and set(chosen) <= set(grid)
    assert chosen[0] == grid[0] and chosen[-1] == grid[-1]
    positions = np.searchsorted(grid, chosen)
    assert np.diff(positions).max() - np.diff(positions).min() <= 1      # evenly among the grid's entries
    np.testing.assert_array_equal(histogram_steps(log_steps(50, 200), 32), histogram_steps(np.arange(51), 32))
    assert histogram_steps(grid, 0).size == 0 and histogram_steps(np.arange(5), 32).tolist() == [0, 1, 2, 3, 4]


def test_the_saved_product_is_the_product_of_the_saved_factors_and_ends_at_the_summary(make_cfg, tmp_path):
    summary = run(make_cfg(*TINY, "model.depth=4", "run.save_factors=true", "run.log_entries=[[2,1],[1,1]]"))
    saved = load_run(tmp_path / "run")
    T, B = len(saved.t), 6
    assert saved.product.shape == (T, B, 2, 2)                        # m·n = 4 ≤ 64: saved by default
    assert [f.shape for f in saved.factors] == [(T, B, 2, 2)] * 4
    factors = [torch.from_numpy(f) for f in saved.factors]
    # N − 1 = 3 float64 matmuls of O(1) entries: rounding of a few ulps
    np.testing.assert_allclose(saved.product, chain(factors).numpy(), rtol=1e-12, atol=1e-15)
    final = summary["final"]
    last = saved.product[-1]
    np.testing.assert_allclose(np.linalg.svd(last, compute_uv=False), final["singular_values"], rtol=1e-12)
    np.testing.assert_array_equal(last[:, 0, 1], final["w12"])
    np.testing.assert_array_equal(last[:, 1, 0], final["w21"])
    # the chosen entries, 1-based: w21 = W[1, 0] (the seed task's own), w11 = W[0, 0]
    np.testing.assert_array_equal(saved.series("w11"), saved.product[:, :, 0, 0])
    np.testing.assert_array_equal(saved.series("w21"), saved.product[:, :, 1, 0])
    # G_p by one call, against the logged ‖G_p‖_F (computed in the run from the live factors)
    G = saved.balancedness()
    assert [g.shape for g in G] == [(T, B, 2, 2)] * 3
    for p, g in enumerate(G, start=1):
        np.testing.assert_allclose(np.linalg.norm(g, axis=(-2, -1)), saved.series(f"balancedness_{p}"), rtol=1e-12)
    # the singular values as scalars, in the summary's aggregates too
    np.testing.assert_array_equal(saved.series("sigma_2"), saved.trajectory["singular_values"][:, :, 1])
    assert summary["aggregates"]["sigma_1"]["median"] == pytest.approx(np.median(final["singular_values"], 0)[0])
    assert "product" not in final and "factor_1" not in final     # the JSON keeps the observables


def test_save_product_follows_the_size_unless_set(make_cfg, tmp_path):
    big = ["task=completion", "task.size=9", "task.observations=40", "replicas=2", "run.steps=20", "run.log_points=4"]
    run(make_cfg(*big, out="auto"))
    run(make_cfg(*big, "run.save_product=true", out="on"))
    run(make_cfg("replicas=2", "run.steps=20", "run.save_product=false", out="off"))
    assert load_run(tmp_path / "auto").product is None                # 81 entries > 64
    assert load_run(tmp_path / "on").product.shape[-2:] == (9, 9)
    assert load_run(tmp_path / "off").product is None
    with pytest.raises(ValueError, match="run.save_factors=true"):
        load_run(tmp_path / "off").balancedness()


def test_large_saved_factors_warn_with_their_size(make_cfg, monkeypatch):
    import dlntorch.recorder as recorder
    monkeypatch.setattr(recorder, "FACTORS_WARN_BYTES", 1000)
    rows = len(log_steps(100, 20))               # 18 distinct logged steps
    size = rows * 2 * 3 * 4 * 8                  # × 2 replicas × 3 factors of 2x2 × 8 bytes = 3456 bytes
    with pytest.warns(UserWarning, match=rf"run.save_factors=true keeps {size / 1024:.1f} KiB of factors "
                                         rf"\({rows} logged times × 2 replicas\)"):
        run(make_cfg("replicas=2", "run.steps=100", "run.log_points=20", "run.save_factors=true"))


@pytest.mark.parametrize("entries, allowed", [("[[3,1]]", "1 ≤ i ≤ 2 and 1 ≤ j ≤ 2"), ("[[1]]", "1 ≤ i ≤ 2"),
                                              ("[[0,1]]", "(1-based)")])
def test_log_entries_outside_the_matrix_are_one_sentence(make_cfg, entries, allowed):
    with pytest.raises(ConfigError, match=r"^run\.log_entries=\[\[.*\]\] is not allowed: .*") as error:
        run(make_cfg(f"run.log_entries={entries}"))
    assert allowed in str(error.value) and str(error.value).count(". ") == 0


# ------------------------------------------------------------------------ a sweep, in process

@pytest.fixture
def in_process_multirun(monkeypatch, tmp_path):
    """Hydra's multirun through the CLI's own @hydra.main, its basic launcher running the jobs here."""
    from dlntorch import cli

    def sweep(*args: str):
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", ["dlntorch", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                          "run.progress=false", *args])
        cli.main()
        return tmp_path / "sweep"

    monkeypatch.chdir(tmp_path)
    yield sweep
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None     # later runs in this process are not jobs of this sweep


def test_a_sweeps_hparams_list_only_the_swept_keys_and_its_jobs_are_named_by_them(in_process_multirun):
    sweep = in_process_multirun(*TINY, "model.depth=1,2", "init.scale=1e-2,1e-1")
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_init.scale=0.01,model.depth=1,replicas=6,run.log_points=20,run.steps=300",
                    "1_init.scale=0.1,model.depth=1,replicas=6,run.log_points=20,run.steps=300",
                    "2_init.scale=0.01,model.depth=2,replicas=6,run.log_points=20,run.steps=300",
                    "3_init.scale=0.1,model.depth=2,replicas=6,run.log_points=20,run.steps=300"]
    for job in jobs:
        reader = events(sweep / job)
        experiment = hparams_of(reader, "experiment").experiment
        assert [h.name for h in experiment.hparam_infos] == ["model.depth", "init.scale"]
        assert [m.name.tag for m in experiment.metric_infos] == [
            "hparam/converged_fraction", "hparam/near_rank_one_fraction", "hparam/energy_median",
            "hparam/effective_rank_median",
            "hparam/balancedness_median", "hparam/diverged"]
        values = hparams_of(reader, "session_start_info").session_start_info.hparams
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert {k: v.number_value for k, v in values.items()} == \
            {"model.depth": summary["depth"], "init.scale": summary["config"]["init"]["scale"]}
        (final,) = reader.Scalars("hparam/energy_median")
        assert (final.step, final.value) == (summary["steps"], pytest.approx(summary["aggregates"]["energy"]["median"]))
    # resume=true is left out of the job dirs' names: the same jobs, each returning its summary
    before = {job: (sweep / job / "summary.json").read_text() for job in jobs}
    in_process_multirun(*TINY, "model.depth=1,2", "init.scale=1e-2,1e-1", "resume=true")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == jobs
    assert {job: (sweep / job / "summary.json").read_text() for job in jobs} == before


def test_collect_orders_named_job_dirs_by_their_number():
    from pathlib import Path

    from dlntorch.collect import _natural
    names = ["10_model.depth=2", "2_model.depth=3", "1_model.depth=1", "extra"]
    assert sorted(names, key=lambda n: _natural(Path(n))) == ["1_model.depth=1", "2_model.depth=3",
                                                              "10_model.depth=2", "extra"]


def test_swept_keys_are_the_sweeps_of_the_command_line_and_of_the_sweeper():
    from dlntorch.report import swept_keys
    multirun = {"hydra": {"overrides": {"task": ["model.depth=2,3", "replicas=64", "optim=gd,langevin",
                                                 "+tags.note=a", "init.scale=range(1,3)"]},
                          "sweeper": {"params": {"optim.lr": "0.01,0.1", "seed": "0"}}}}
    assert swept_keys(multirun) == ["model.depth", "optim", "init.scale", "optim.lr"]


def test_hparams_of_a_sweep_job_are_its_values_of_the_swept_keys():
    from dlntorch.report import hparams
    config = {"model": {"depth": 3}, "init": {"scale": 0.1}, "optim": {"name": "langevin", "lr": 0.05},
              "replicas": 8, "seed": 0}
    shown = hparams(config, ["model.depth=3", "optim=langevin", "replicas=8"], swept=["optim", "model.depth"])
    assert shown == {"optim": "langevin", "model.depth": 3}


def test_the_headline_metrics_include_the_converged_fraction_once_the_summary_counts_it():
    from dlntorch.report import headline
    summary = {"replicas": 8, "near_rank_one": 2, "diverged_count": 1,
               "aggregates": {"energy": {"median": 0.5}, "effective_rank": {"median": 1.5},
                              "balancedness": {"median": 0.01}}}
    expected = {"near_rank_one_fraction": 0.25, "energy_median": 0.5, "effective_rank_median": 1.5,
                "balancedness_median": 0.01, "diverged": 1.0}
    assert headline(summary) == expected
    assert headline({**summary, "converged": 6}) == {"converged_fraction": 0.75, **expected}
