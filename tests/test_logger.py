"""The logger's pieces: aggregates over live replicas, the npz writer."""
import warnings

import numpy as np

from dlntorch.logger import aggregate, aggregate_rows
from dlntorch.npzfile import write_npz


def test_aggregates_equal_numpys_nan_functions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 257))
    x[1, :100] = np.nan          # some replicas diverged
    x[2, :] = np.nan             # all of them
    x[3, :-1] = np.nan           # all but one
    x[4, :] = 7.0                # ties
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # numpy warns on the all-NaN row
        expected = {"mean": np.nanmean(x, 1), "median": np.nanmedian(x, 1), "min": np.nanmin(x, 1),
                    "max": np.nanmax(x, 1), "q10": np.nanquantile(x, 0.1, axis=1),
                    "q90": np.nanquantile(x, 0.9, axis=1)}
    got = aggregate_rows(x)
    for key, value in expected.items():
        # the same linear interpolation between the same order statistics; sums in another order
        np.testing.assert_allclose(got[key], value, rtol=1e-14, atol=0, equal_nan=True)
    assert aggregate(x[0])["median"] == got["median"][0]


def test_npz_round_trips_exactly(tmp_path):
    arrays = {"t": np.linspace(0, 1, 5), "energy": np.random.default_rng(1).normal(size=(5, 3)),
              "singular_values": np.full((5, 3, 2), np.nan)}
    with open(tmp_path / "a.npz", "wb") as handle:
        write_npz(handle, arrays)
    with np.load(tmp_path / "a.npz") as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(loaded[key], value)


def test_fast_event_checksums_equal_tensorboards():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    from dlntorch.logger import masked_crc32c
    for data in (b"", b"a", bytes(range(256)) * 41, np.random.default_rng(2).bytes(10_001)):
        assert masked_crc32c(data) == reference(data)


def test_hparams_are_the_core_keys_and_the_swept_ones():
    from dlntorch.report import hparams
    config = {"experiment": "seed2x2", "task": {"name": "seed2x2", "size": 2}, "model": {"depth": 3, "widths": None},
              "init": {"name": "gaussian", "scale": 0.01, "scale_of": "layer", "imbalance": 1.0},
              "optim": {"name": "langevin", "lr": 0.05, "beta": 1e4, "rtol": 1e-10},
              "run": {"steps": 100, "log_points": 50}, "replicas": 8, "seed": 0}
    shown = hparams(config, ["model.depth=3", "run.log_points=50", "+tags.note=x"])
    assert list(shown) == ["experiment", "task.name", "model.depth", "model.widths", "init.name", "init.scale",
                           "init.scale_of", "optim.name", "optim.lr", "replicas", "seed", "optim.beta",
                           "run.log_points"]
    assert shown["model.widths"] == "None" and shown["optim.beta"] == 1e4   # TensorBoard takes no None


def deflated_sizes(path) -> dict[str, int]:
    import zipfile
    with zipfile.ZipFile(path) as archive:
        return {i.filename: i.compress_size for i in archive.infolist() if i.compress_type == zipfile.ZIP_DEFLATED}


def level_one_sizes(path) -> dict[str, int]:
    """What raw deflate at level 1 (the level npzfile.DEFLATE_LEVEL names) makes of each deflated
    member's bytes: zlib is deterministic, so a member written at another level differs in size."""
    import zipfile
    import zlib
    sizes = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type == zipfile.ZIP_DEFLATED:
                packer = zlib.compressobj(1, zlib.DEFLATED, -15)
                sizes[info.filename] = len(packer.compress(archive.read(info)) + packer.flush())
    return sizes


def test_npz_deflates_only_what_shrinks_and_round_trips(tmp_path):
    """Noise (float64 observables) is stored, flags and ranks are deflated: both read back exactly."""
    import zipfile
    rng = np.random.default_rng(2)
    arrays = {"energy": rng.normal(size=(40, 4096)), "diverged": np.zeros((40, 4096)),
              "numerical_rank": np.where(rng.random((40, 4096)) < 0.01, 1.0, 2.0)}
    with open(tmp_path / "b.npz", "wb") as handle:
        write_npz(handle, arrays)
    with zipfile.ZipFile(tmp_path / "b.npz") as archive:
        kinds = {info.filename: info.compress_type for info in archive.infolist()}
    assert kinds == {"energy.npy": zipfile.ZIP_STORED, "diverged.npy": zipfile.ZIP_DEFLATED,
                     "numerical_rank.npy": zipfile.ZIP_DEFLATED}
    assert deflated_sizes(tmp_path / "b.npz") == level_one_sizes(tmp_path / "b.npz")
    with np.load(tmp_path / "b.npz") as loaded:
        for key, value in arrays.items():
            np.testing.assert_array_equal(loaded[key], value)


def test_summary_json_reads_back_as_the_indented_encoder_wrote_it(tmp_path):
    """Lists of numbers on one line (C encoder), the rest indented: the same JSON either way."""
    import json

    import torch

    from dlntorch.logger import _jsonable, write_json
    data = {"final": {"energy": np.array([1.0, np.nan, np.inf]), "diverged": [False, True, False],
                      "rank_jumps": [[[0.1, 2.0, 2, 1]], [], [[1.0, 3.0, 1, 2], [3.0, 9.0, 2, 1]]]},
            "widths": (2, 2, 2), "t": torch.tensor([0.5, 1.5]), "names": ["a", "b"], "empty": [],
            "none": None, "nested": [{"a": np.float64(1.5)}], "path": tmp_path}
    write_json(tmp_path / "s.json", data)
    text = (tmp_path / "s.json").read_text()
    keep = {"parse_constant": str}       # NaN and Infinity compared as their spellings
    assert json.loads(text, **keep) == json.loads(json.dumps(data, default=_jsonable), **keep)
    assert '"energy": [1.0, NaN, Infinity]' in text and '"nested": [\n' in text


def test_an_atomic_write_takes_its_name_only_after_before_rename(tmp_path):
    """summary.json must not appear before the final checkpoint is on disk (train.finish): the
    file is written whole first, named only once before_rename returns, and if before_rename
    raises, the old file stays and no temporary file is left."""
    import pytest

    from dlntorch.logger import atomic_write_bytes
    path = tmp_path / "summary.json"
    path.write_text("old")
    seen = []
    atomic_write_bytes(path, lambda h: h.write(b"new"), before_rename=lambda: seen.append(path.read_text()))
    assert seen == ["old"] and path.read_text() == "new"

    def fails():
        raise OSError("the checkpoint could not be written")
    with pytest.raises(OSError, match="checkpoint"):
        atomic_write_bytes(path, lambda h: h.write(b"newer"), before_rename=fails)
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
