"""Huge rows are observed in blocks of replicas (recorder.OBSERVE_REPLICAS) and summary.json's
per-replica columns are written in blocks (logger.JSON_BLOCK), so that memory does not grow with
a row's whole B at once; the observables are per replica, so the blocks must change no bit of
trajectory.npz or summary.json."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dlntorch import logger, recorder
from dlntorch.train import run

# 150 replicas, several snapshots observed in one flush (so blocks of 64 split snapshots, and span
# two); gd at lr 0.4 from scale 1 diverges some (the masked path of observe, in some blocks and not
# others); langevin has the product's drift
CASES = {
    "gd": ["task=seed2x2", "optim=gd", "optim.lr=0.4", "init.scale=1.0", "run.sharpness_iterations=3",
           "run.save_factors=true", "run.sigma_k=2", "run.log_entries=[[1,2]]"],
    "langevin": ["task=seed2x2", "optim=langevin", "model.depth=3"],
}
COMMON = ["replicas=150", "run.steps=60", "run.log_points=8", "run.histogram_points=0"]


def outputs(make_cfg, monkeypatch, case: str, size: int) -> tuple[dict[str, bytes], dict]:
    """trajectory.npz (each member's shape and bytes) and summary.json (less the run dir and wall
    time) of the case observed `size` replicas at a time."""
    monkeypatch.setattr(recorder, "OBSERVE_REPLICAS", size)
    cfg = make_cfg(*CASES[case], *COMMON, out=f"{case}-{size}")
    run(cfg)
    with np.load(f"{cfg.run.out_dir}/trajectory.npz") as data:
        npz = {key: (data[key].shape, data[key].tobytes()) for key in data.files}
    summary = json.loads(open(f"{cfg.run.out_dir}/summary.json").read())
    for key in ("out_dir", "wall_time", "config"):
        summary.pop(key)
    return npz, summary


@pytest.mark.parametrize("case", list(CASES))
def test_observing_in_blocks_changes_no_bit_of_the_outputs(make_cfg, monkeypatch, case):
    whole_npz, whole_summary = outputs(make_cfg, monkeypatch, case, 1 << 16)   # every snapshot at once
    if case == "gd":
        assert 0 < whole_summary["diverged_count"] < 150        # masked and unmasked blocks both
    assert whole_npz["t"][0][0] > 2                             # several logged rows
    # blocks of 64 and 192 (multiples of 64, as observed_batches needs), the last one short
    for size in (64, 192):
        npz, summary = outputs(make_cfg, monkeypatch, case, size)
        assert list(npz) == list(whole_npz), size               # same members, same order
        for key in whole_npz:
            assert npz[key] == whole_npz[key], (size, key)      # same shape and bytes
        assert summary == whole_summary, size


def test_observed_batches_cover_the_replicas_in_order():
    for K, B, size in [(3, 7, 64), (30, 7, 64), (3, 150, 64), (3, 150, 128), (3, 7, 1 << 16), (1, 1000, 192)]:
        batches = recorder.observed_batches(K, B, size)
        flat = [(k, i) for batch in batches for k, b, e in batch for i in range(b, e)]
        assert flat == [(k, i) for k in range(K) for i in range(B)]
        assert [sum(e - b for _, b, e in batch) for batch in batches[:-1]] == [size] * (len(batches) - 1)
    with pytest.raises(ValueError, match="size=3 is not allowed"):    # would split the SIMD loops elsewhere
        recorder.observed_batches(3, 7, 3)


@pytest.mark.parametrize("array", [np.array([0.1, np.nan, -np.inf, 1e300, 3.0, 2.5e-320, 7.0]),
                                   np.arange(14.0).reshape(7, 2) / 3, np.array([True, False, True]),
                                   np.arange(5), np.zeros((0, 2))])
def test_an_array_leaf_is_written_in_blocks_as_jsons_own_text(monkeypatch, array):
    monkeypatch.setattr(logger, "JSON_BLOCK", 2)
    assert "".join(logger.json_leaf(array)) == json.dumps(array.tolist())
