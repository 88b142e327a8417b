"""The private interfaces behind dlntorch.compat, and the public paths it falls back to: each
fallback gives the same result as the private path (slower, not different)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dlntorch import compat
from dlntorch.logger import TensorBoardLog, masked_crc32c


def test_tested_reads_major_minor():
    assert compat.tested("torch", "2.13.0+cpu") and compat.tested("torch", "2.0.1")
    assert not compat.tested("torch", "3.0.0") and not compat.tested("torch", "1.13.1")
    assert not compat.tested("tensorboard", "nightly")


def rows(B=3, K=2):
    rng = np.random.default_rng(0)
    return [{"step": np.asarray(10 * k), "t": np.asarray(0.5 * k), "diverged": np.zeros(B),
             "energy": rng.random(B), "effective_rank": 1 + rng.random(B)} for k in range(K)]


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_scalars_through_add_scalar_when_the_private_writer_is_untested(tmp_path, monkeypatch):
    private = TensorBoardLog(tmp_path / "private", replicas_shown=2)
    assert compat.file_writer(private.writer) is not None
    private.scalars(rows())
    private.close()
    monkeypatch.setitem(compat.TESTED, "tensorboard", ((0, 0), (0, 1)))   # this version: untested
    public = TensorBoardLog(tmp_path / "public", replicas_shown=2)
    assert compat.file_writer(public.writer) is None
    public.scalars(rows())
    public.close()
    a, b = read_scalars(tmp_path / "private"), read_scalars(tmp_path / "public")
    assert a == b and "energy/median" in a and len(a["energy/median"]) == 2


def test_the_crc_is_replaced_only_where_tested(monkeypatch):
    from tensorboard.summary.writer import record_writer
    original = record_writer.masked_crc32c
    monkeypatch.setattr(record_writer, "masked_crc32c", original)   # restored after the test
    monkeypatch.setitem(compat.TESTED, "tensorboard", ((0, 0), (0, 1)))
    assert compat.install_event_checksums(masked_crc32c) is False
    assert record_writer.masked_crc32c is original                  # TensorBoard keeps its own
    monkeypatch.setitem(compat.TESTED, "tensorboard", ((0, 0), (99, 99)))
    assert compat.install_event_checksums(masked_crc32c) is True
    assert record_writer.masked_crc32c is masked_crc32c
    data = bytes(range(256)) * 5
    assert masked_crc32c(data) == original(data)                    # the same checksum either way


def test_an_unknown_version_equals_nothing(monkeypatch):
    monkeypatch.setattr(compat, "TRACK_VERSIONS", False)
    t = torch.zeros(2)
    # each read is a fresh value equal to no other: two records of the same tensor never match
    assert [(t.data_ptr(), compat.tensor_version(t))] != [(t.data_ptr(), compat.tensor_version(t))]
    monkeypatch.setattr(compat, "TRACK_VERSIONS", True)
    before = compat.tensor_version(t)
    t.add_(1)
    assert compat.tensor_version(t) == before + 1        # torch's in-place counter


@pytest.mark.parametrize("track", [True, False])
def test_planes_refresh_without_version_counters(make_cfg, monkeypatch, track):
    """Without Tensor._version the planes are refreshed on every advance: the same trajectory,
    bit for bit, as with it, including a change made to the parameters from outside."""
    from dlntorch.dynamics import StepDynamics
    from dlntorch.train import Lab

    def trajectory(out):
        cfg = make_cfg("replicas=600", "init.scale=0.5", "optim.lr=0.02", out=out)
        lab = Lab(cfg)
        dyn = StepDynamics(cfg, lab.net, lab.task, lab.seeds["dynamics"], layout="planes")
        dyn.advance(5)
        dyn.net.set_factors([0.5 * f for f in dyn.factors()])
        dyn.advance(5)
        return [f.clone() for f in dyn.factors()]

    monkeypatch.setattr(compat, "TRACK_VERSIONS", True)
    reference = trajectory("tracked")
    monkeypatch.setattr(compat, "TRACK_VERSIONS", track)
    got = trajectory(f"track-{track}")
    assert all(torch.equal(a, b) for a, b in zip(reference, got))


@pytest.mark.slow
def test_a_run_never_imports_dynamo_and_a_compile_still_finds_it(tmp_path):
    """A fresh process: a whole default run (its optimizer built, stepped, checkpointed) leaves
    torch._dynamo unimported; once something imports it, the same Optimizer methods take torch's
    own path (torch._dynamo.disable) and still give the same state."""
    import subprocess
    import sys
    script = f"""
import sys
from dlntorch.train import run
run({{"replicas": 4, "run": {{"steps": 50, "out_dir": {str(tmp_path / 'run')!r}, "progress": False}},
      "device": "cpu"}})
assert "torch._dynamo" not in sys.modules, "a run imported torch._dynamo"
import torch, torch._dynamo
p = torch.nn.Parameter(torch.ones(3))
opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
p.grad = torch.ones(3)
opt.step()
state = opt.state_dict()
fresh = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
fresh.load_state_dict(state)
assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"], torch.ones(3))
fn = torch.optim.Optimizer.state_dict.__wrapped__
assert getattr(fn, "__dynamo_disable").__module__.startswith("torch"), "not torch's own path after the import"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_deferred_methods_behave_as_torchs():
    """In this process (dynamo may or may not be imported): an optimizer's state round-trips."""
    assert compat.defer_dynamo_import() in (True, False)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.5)
    p.grad = torch.full((2,), 2.0)
    opt.step()
    opt.zero_grad()
    assert p.grad is None and torch.equal(p.detach(), torch.zeros(2))
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.5


def test_dynamo_stays_torchs_own_where_torch_is_untested(monkeypatch):
    monkeypatch.setattr(compat, "DYNAMO_DEFERRED", False)
    monkeypatch.setattr(compat, "_torch_tested", lambda: False)
    assert compat.defer_dynamo_import() is False and compat.DYNAMO_DEFERRED is False
