"""Bad input ends before any training with one sentence naming the key, the value and what is
allowed (ConfigError; the CLI turns it into that sentence and exit status 2)."""

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ConfigKeyError, ValidationError

from dlntorch.config import ConfigError
from dlntorch.train import run

BAD = [
    (["model.depth=0"], "model.depth", "0"),
    (["model.widths=[2,0,2]"], "model.widths", "[2, 0, 2]"),
    (["model.widths=[3,4,2]"], "model.widths", "[3, 4, 2]"),
    (["model.widths=[2,3,3,2]", "model.depth=2"], "model.depth", "2"),
    (["optim.lr=0"], "optim.lr", "0"),
    (["optim.lr=-0.1"], "optim.lr", "-0.1"),
    (["optim.lr=inf"], "optim.lr", "inf"),
    (["optim.lr=nan"], "optim.lr", "nan"),
    (["optim=langevin", "optim.beta=0"], "optim.beta", "0"),
    (["optim=langevin", "optim.beta=-2"], "optim.beta", "-2"),
    (["replicas=0"], "replicas", "0"),
    (["task=completion", "task.size=5", "task.observations=26"], "task.observations", "26"),
    (["task=completion", "task.observations=0"], "task.observations", "0"),
    (["task=completion", "task.size=5", "task.rank=6"], "task.rank", "6"),
    (["task=completion", "task.shape=[3,5]", "task.rank=4"], "task.rank", "4"),
    (["task=completion", "task.size=3", "task.spectrum=[3,2,1,0.5]"], "task.spectrum", "[3.0, 2.0, 1.0, 0.5]"),
    (["task=sensing", "task.spectrum=[1,-1]"], "task.spectrum", "[1.0, -1.0]"),
    (["task.loss=l1"], "task.loss", "'l1'"),
    (["dtype=float16"], "dtype", "'float16'"),
    (["device=tpu"], "device", "'tpu'"),
    (["init.name=xavier"], "init.name", "'xavier'"),
    (["optim.name=lbfgs"], "optim.name", "'lbfgs'"),
    (["init.scale=0"], "init.scale", "0"),
    (["run.steps=0"], "run.steps", "0"),
    (["run.log_points=1"], "run.log_points", "1"),
]


@pytest.mark.parametrize("overrides,key,value", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_name_key_value_and_what_is_allowed(make_cfg, tmp_path, overrides, key, value):
    cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError) as error:
        run(cfg)
    message = str(error.value)
    assert message.startswith(f"{key}={value} is not allowed: ") and message.endswith(".")
    assert message.count("\n") == 0
    assert not (tmp_path / "run").exists()       # nothing written: it failed before any compute


def test_cuda_without_cuda(make_cfg):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device=cuda is valid here")
    with pytest.raises(ConfigError, match=r"^device='cuda' is not allowed: this machine has no CUDA"):
        run(make_cfg("device=cuda"))


def completion_file(tmp_path, name, **arrays):
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        torch.save({k: torch.as_tensor(v) for k, v in arrays.items()}, path)
    return str(path)


def test_task_file_missing(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^task.file='.*nope.npz' is not allowed: no such file\.$"):
        run(make_cfg("task=completion", f"task.file={tmp_path}/nope.npz"))


def test_task_file_unreadable(make_cfg, tmp_path):
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"this is not an archive")
    with pytest.raises(ConfigError, match=r"^task.file='.*garbage.npz' is not allowed: it could not be read"):
        run(make_cfg("task=completion", f"task.file={bad}"))


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_task_file_mask_and_values_disagree(make_cfg, tmp_path, suffix):
    path = completion_file(tmp_path, "data" + suffix, mask=np.ones((3, 3), bool), values=np.ones((3, 4)))
    with pytest.raises(ConfigError, match=r"is not allowed: mask and values must be matrices of one shape "
                                          r"\(mask \(3, 3\), values \(3, 4\)\)\.$"):
        run(make_cfg("task=completion", f"task.file={path}"))


def test_task_file_without_the_arrays(make_cfg, tmp_path):
    path = completion_file(tmp_path, "data.npz", M=np.ones((3, 3)))
    with pytest.raises(ConfigError, match=r"must hold arrays named 'mask' and 'values' \(found \['M'\]\)\.$"):
        run(make_cfg("task=completion", f"task.file={path}"))


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_task_file_is_trained_on(make_cfg, tmp_path, suffix):
    mask = np.array([[1, 1, 0], [0, 1, 1]], bool)
    truth = np.outer([1.0, 2.0], [1.0, -1.0, 0.5])
    path = completion_file(tmp_path, "data" + suffix, mask=mask, values=np.where(mask, truth, 0.0), truth=truth)
    summary = run(make_cfg("task=completion", f"task.file={path}", "replicas=4", "run.steps=200"))
    assert summary["widths"][0] == 3 and summary["widths"][-1] == 2
    assert "test_error" in summary["final"]


def test_init_file_errors(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^init.file=None is not allowed: init=file needs the path"):
        run(make_cfg("init=file"))
    with pytest.raises(ConfigError, match=r"^init.file='.*none.pt' is not allowed: no such file\.$"):
        run(make_cfg("init=file", f"init.file={tmp_path}/none.pt"))
    torch.save({"product": torch.ones(5, 2, 2)}, tmp_path / "five.pt")
    with pytest.raises(ConfigError, match=r"an array of shape \(5, 2, 2\) does not fit 8 replicas of 2x2 "
                                          r"\(replicas=8\); give shape \(8, 2, 2\) or \(2, 2\)\.$"):
        run(make_cfg("init=file", f"init.file={tmp_path}/five.pt", "replicas=8"))
    torch.save({"W": torch.ones(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"it must hold factor_1, factor_2, factor_3 \(for depth 3\) or "
                                          r"'product' \(found \['W'\]\)\.$"):
        run(make_cfg("init=file", f"init.file={tmp_path}/other.pt"))
    assert not (tmp_path / "run").exists()      # nothing written before the inputs were checked


def test_widths_must_match_a_file_task(make_cfg, tmp_path):
    path = completion_file(tmp_path, "data.npz", mask=np.ones((2, 3), bool), values=np.ones((2, 3)))
    with pytest.raises(ConfigError, match=r"^model.widths=\[2, 4, 2\] is not allowed: its ends must match "
                                          r"the task's 2x3 matrix: d_0 = 3 and d_N = 2\.$"):
        run(make_cfg("task=completion", f"task.file={path}", "model.widths=[2,4,2]"))


@pytest.mark.parametrize("overrides", [["model.deph=3"], ["replicas=many"], ["init=xavier"],
                                       ["experiment=nope"], ["optim.lr=fast"]])
def test_typos_and_wrong_types_fail_in_hydra(make_cfg, overrides):
    with pytest.raises((ConfigCompositionException, HydraException, ValidationError, ConfigKeyError)):
        make_cfg(*overrides)


def test_widths_define_the_depth(make_cfg):
    summary = run(make_cfg("model.widths=[2,3,3,3,2]", "replicas=2", "run.steps=10"))
    assert summary["depth"] == 4 and summary["widths"] == [2, 3, 3, 3, 2]


EXPERIMENTS = ["seed2x2", "other_minimisers", "free_energy", "infinite_depth", "balance_by_noise",
               "conservation", "rank_jumps", "practical_vs_flow",
               "saxe2014", "razin2020", "shin_yun2025", "kleinman2024", "arora2019"]   # the reproductions


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_and_runs(make_cfg, experiment):
    summary = run(make_cfg(f"experiment={experiment}", "replicas=2", "run.steps=20", "run.time=null"))
    assert summary["config"]["experiment"] == experiment and summary["steps"] <= 20


def test_the_atlas_lists_every_preset():
    from pathlib import Path
    presets = sorted(p.stem for p in (Path(__file__).parents[1] / "dlntorch/conf/experiment").glob("*.yaml"))
    assert presets == sorted(EXPERIMENTS)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in presets:
        assert f"`{name}`" in readme


def test_a_key_of_another_optimiser_is_refused_at_start_up(make_cfg):
    """Each optimiser has its own schema: gd has no inverse temperature, so optim.beta is refused
    by Hydra (naming the key), not silently ignored; from Python, OmegaConf refuses it the same way."""
    with pytest.raises(ConfigCompositionException) as error:
        make_cfg("optim=gd", "optim.beta=5")
    assert "optim.beta" in str(error.value) + str(error.value.__cause__)
    # issue 9: refused in one sentence (ConfigError) naming the key, where OmegaConf's
    # ConfigKeyError ("Key 'beta' not in 'GdConfig'") was raised before
    with pytest.raises(ConfigError, match=r"^optim\.beta is not a key of the config; the keys of optim are "):
        run({"optim": {"name": "gd", "beta": 5}})
    with pytest.raises(ConfigError, match=r"^optim\.batch_size is not a key of the config; the keys of optim "
                                          r"are beta, decay_every, decay_factor, kappa, label_noise, lr, name, noise"):
        run(make_cfg("optim=langevin", "+optim.batch_size=3"))


def test_each_optimiser_yaml_is_typed_by_its_own_schema(make_cfg):
    from omegaconf import OmegaConf

    from dlntorch.config import as_config, registries
    for name, option in registries()["optim"].options.items():
        if option.schema is None or name.startswith("toy_"):
            continue
        cfg = make_cfg(f"optim={name}")
        assert OmegaConf.get_type(cfg.optim) is option.schema, name
        assert OmegaConf.get_type(as_config(cfg).optim) is option.schema, name
    # optim.name alone (on the gd yaml) picks the named optimiser's schema and its defaults
    picked = as_config(make_cfg("optim.name=langevin"))
    assert picked.optim.beta == 1e4 and picked.optim.noise == "isotropic"
