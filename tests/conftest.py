"""Shared test setup: one torch thread (two torch processes on two cores slow each other 10-100x),
float64 everywhere, and Hydra's compose API so most tests run in this one process."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg("optim=langevin", "replicas=8") → the composed config, writing under tmp_path."""
    def make(*overrides: str, out: str = "run"):
        GlobalHydra.instance().clear()
        with initialize_config_module("dlntorch.conf", version_base="1.3"):
            cfg = compose("config", overrides=[f"run.out_dir={tmp_path / out}", "run.progress=false",
                                               *overrides])
        return cfg
    return make


@pytest.fixture
def killed_and_resumed(make_cfg, monkeypatch):
    """killed_and_resumed(*overrides) → (uninterrupted summary, resumed summary): the same run once
    whole, and once killed past step 250 (after a checkpoint) then resumed with resume=true."""
    def go(*common: str, after: int = 250):
        from dlntorch.train import Lab, run
        whole = run(make_cfg(*common, out="whole"))
        check = Lab.check

        def crash(self):
            if self.state.step > after:
                raise KeyboardInterrupt("killed")
            return check(self)

        monkeypatch.setattr(Lab, "check", crash)
        with pytest.raises(KeyboardInterrupt):
            run(make_cfg(*common, out="split"))
        monkeypatch.setattr(Lab, "check", check)
        saved = torch.load(make_cfg(out="split").run.out_dir + "/checkpoint.pt", weights_only=False)
        assert 0 < saved["step"] <= after + 100       # it really resumes mid-run, from a checkpoint
        return whole, run(make_cfg(*common, "resume=true", out="split"))
    return go


@pytest.fixture
def killed_past_checkpoint():
    """killed_past_checkpoint(command, out, watched, growth, env=None, cwd=None): run a
    `python -m dlntorch` command until its first checkpoint is on disk (within 120 s), then until
    the file `watched()` names has grown by `growth` bytes past that moment (output written after
    the checkpoint), then SIGKILL it; asserts it had not finished by then."""
    import signal
    import subprocess
    import time

    def kill(command: list[str], out, watched, growth: int, env=None, cwd=None) -> None:
        job = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while not (out / "checkpoint.pt").exists():
                assert job.poll() is None and time.monotonic() < deadline, job.stderr.read().decode()
                time.sleep(0.002)
            path = watched()
            size = path.stat().st_size
            while path.stat().st_size < size + growth and job.poll() is None:
                time.sleep(0.002)
            job.send_signal(signal.SIGKILL)
            job.wait()
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        assert not (out / "summary.json").exists(), "the run finished before it could be killed: make it longer"
    return kill
