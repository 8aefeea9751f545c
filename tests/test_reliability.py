"""Issue 9: crash-safe checkpoints, exact resume, safe loading, a clear error for every bad input.

* A training process is SIGKILLed at random moments, many times in a row; it always
  resumes, and its final weights, optimizer state, RNG state and metrics log are
  bit-identical to an uninterrupted run's.
* Corrupted checkpoints (flipped bytes anywhere, truncations, a broken config,
  weights that do not fit the config), pickle files and a full disk each give
  their one-line error, and nothing from a pickle is ever executed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import condiff.checkpoints as checkpoints
from condiff.checkpoints import latest_checkpoint, load_checkpoint, load_latest_checkpoint
from condiff.errors import CondiffError
from helpers import assert_one_line_error, run_cli_inprocess, shapes_dataset, write_npz

N_KILLS = 15
STEPS = 150  # enough that 15 kills land before the end even on an idle machine (each life may run ~0.3 s)
TINY = ["--channels", "4,8", "--blocks", "1", "--T", "50", "--image-size", "8", "--no-progress", "--device", "cpu"]


def _train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--steps", str(STEPS), "--batch-size", "8",
            "--lr", "3e-3", "--warmup", "5", "--p-uncond", "0.3", "--ckpt-every", "1", "--keep", "2",
            "--log-every", "1", "--seed", "7", *TINY]


def _newest_step(run: Path) -> int:
    ck = latest_checkpoint(run)
    return -1 if ck is None else int(ck.name.split("-")[1])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _log(run: Path, strict: bool = True) -> list[dict]:
    """The metrics log; ``strict=False`` drops a line cut short by a kill (the next life rewrites it)."""
    path = run / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if strict:
                raise
    return records


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ForkServer:
    """Client of tests/forkserver.py: start ``condiff`` runs as forked processes, reap them."""

    def __init__(self, env):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().split()[1]

    def run(self, log: Path, argv: list[str]) -> int:
        return int(self._ask(f"run {log} {json.dumps(argv)}"))

    def wait(self, pid: int) -> int:
        return int(self._ask(f"wait {pid}"))

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_sigkill_at_random_moments_always_resumes_bit_identically(tmp_path, record_property):
    seed = int(os.environ.get("CONDIFF_KILL_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    data = write_npz(tmp_path / "shapes.npz", shapes_dataset(64))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the same threads in every run
    run, ref = tmp_path / "killed", tmp_path / "uninterrupted"
    ref_log = open(tmp_path / "uninterrupted.log", "w")
    reference = subprocess.Popen([sys.executable, "-m", "condiff", *_train_args(data, ref)], stdout=ref_log,
                                 stderr=subprocess.STDOUT, env=env)
    server = ForkServer(env)
    kills, lives = [], 0
    try:
        while len(kills) < N_KILLS:
            before = _newest_step(run)
            log = tmp_path / f"life-{lives}.log"
            pid = server.run(log, _train_args(data, run))
            lives += 1
            if rng.random() < 0.25:  # anywhere in start-up: imports done, data, model, resume, log truncation
                moment = "start-up"
                time.sleep(rng.uniform(0.0, 0.4))
            else:  # anywhere in training: forward, backward, optimizer, EMA, log append, checkpoint write, prune
                moment = "training"
                deadline = time.monotonic() + 300  # a hang guard, not a timing assertion
                while _newest_step(run) <= before and _alive(pid):
                    assert time.monotonic() < deadline, f"no progress in life {lives}: {log.read_text()[-2000:]}"
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            status = server.wait(pid)
            assert status in (-signal.SIGKILL, 0), f"life {lives} exited {status}: {log.read_text()[-2000:]}"
            if status == 0:  # finished before the kill landed; cannot happen before enough kills with STEPS
                break
            ckdir = run / "checkpoints"
            mid_write = ckdir.is_dir() and any(p.name.startswith(".step-") and p.name.endswith(str(pid))
                                               for p in ckdir.iterdir())  # its temporary folder is left
            newest = latest_checkpoint(run)
            resumable = load_checkpoint(newest) if newest is not None else None  # raises if it does not load
            step = resumable["step"] if resumable else 0
            logged = max([r["step"] for r in _log(run, strict=False)], default=0)
            kills.append({"moment": moment, "mid_write": mid_write, "step": step, "lost": max(0, logged - step)})
        assert len(kills) >= N_KILLS, f"the run finished after {len(kills)} kills; raise STEPS (seed {seed})"
        steps = [k["step"] for k in kills]
        assert steps == sorted(steps), f"a kill lost a complete checkpoint: {steps} (seed {seed})"
        assert kills[-1]["step"] < STEPS
        # the last life runs to the end
        log = tmp_path / f"life-{lives}.log"
        status = server.wait(server.run(log, _train_args(data, run)))
        lives += 1
        assert status == 0, log.read_text()[-2000:]
        assert reference.wait(timeout=600) == 0, (tmp_path / "uninterrupted.log").read_text()
    finally:
        server.close()
        if reference.poll() is None:
            reference.kill()
        ref_log.close()

    # the final checkpoint equals the uninterrupted run's, bit for bit
    a, b = latest_checkpoint(run), latest_checkpoint(ref)
    assert a.name == b.name == f"step-{STEPS:07d}"
    for name in ("model.safetensors", "training.safetensors"):
        assert _sha(a / name) == _sha(b / name), f"{name} differs after {len(kills)} kills (seed {seed})"
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for part in ("weights", "raw", "rng"):
        assert ca[part].keys() == cb[part].keys()
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]
    # nothing lost from the metrics log: every step once, the same numbers
    keys = ("step", "loss", "lr", "grad_norm")
    la, lb = [[{k: r[k] for k in keys} for r in _log(x)] for x in (run, ref)]
    assert [r["step"] for r in la] == list(range(1, STEPS + 1))
    assert la == lb, f"metrics differ (seed {seed})"
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # no leftovers at the end

    by = {m: sum(k["moment"] == m for k in kills) for m in ("start-up", "training")}
    figures = (f"SIGKILL: {len(kills)} kills survived in a row over {lives} processes (kill seed {seed}; "
               f"{by['training']} while training, {by['start-up']} during start-up/resume, "
               f"{sum(k['mid_write'] for k in kills)} in the middle of a checkpoint write); the newest checkpoint "
               f"loaded after every kill; at most {max(k['lost'] for k in kills)} logged step(s) redone per kill "
               f"(--ckpt-every 1); final weights, optimizer, RNG and all {STEPS} log lines bit-identical to the "
               f"uninterrupted run: nothing lost")
    record_property("figures", figures)


# --------------------------------------------------------------------------------------------- corrupt inputs
@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    data = write_npz(root / "shapes.npz", shapes_dataset(64))
    rc, _, err = run_cli_inprocess(["train", "--data", data, "--out", root / "run", "--steps", "4", "--batch-size",
                                    "16", "--ckpt-every", "2", "--log-every", "2", "--seed", "1", *TINY])
    assert rc == 0, err
    return root


def _copy_ckpt(model_run: Path, dest: Path) -> Path:
    shutil.copytree(latest_checkpoint(model_run / "run"), dest)
    return dest


def _sample(ckpt, out: Path, *extra) -> tuple[int, str]:
    rc, _, err = run_cli_inprocess(["sample", "--ckpt", ckpt, "--n", "2", "--steps", "3", "--out", out / "x.png",
                                    "--npz", out / "x.npz", "--no-progress", "--device", "cpu", *extra])
    return rc, err


class _Proc:  # assert_one_line_error takes a CompletedProcess-like object
    def __init__(self, rc, err):
        self.returncode, self.stderr = rc, err


def _assert_error(rc, err, out: Path, *needles):
    assert_one_line_error(_Proc(rc, err))
    assert not (out / "x.png").exists() and not (out / "x.npz").exists()  # nothing half-written
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "SHA256SUMS"])
def test_random_byte_flips_anywhere_give_one_line_errors(model_run, tmp_path, name, record_property):
    tried = []  # bad inputs this test tries, for the summary
    rng = random.Random(f"flip-{name}")
    good = latest_checkpoint(model_run / "run") / name
    size = good.stat().st_size
    offsets = sorted({0, 7, size - 1, *(rng.randrange(size) for _ in range(8))})
    for off in offsets:  # header, JSON, tensor data, the manifest: every byte is covered by a check
        ck = _copy_ckpt(model_run, tmp_path / f"flip-{off}")
        raw = bytearray(good.read_bytes())
        raw[off] ^= 1 << rng.randrange(8)
        (ck / name).write_bytes(bytes(raw))
        rc, err = _sample(ck, tmp_path)
        _assert_error(rc, err, tmp_path, "corrupt")
        tried.append(f"flip {name}@{off}")
    record_property("bad_inputs", len(tried))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "training.safetensors"])
def test_truncated_files_give_one_line_errors_and_resume_falls_back(model_run, tmp_path, name, record_property):
    tried = []  # bad inputs this test tries, for the summary
    rng = random.Random(f"trunc-{name}")
    good = latest_checkpoint(model_run / "run") / name
    for cut in sorted({0, 1, 8, *(rng.randrange(good.stat().st_size) for _ in range(4))}):
        ck = _copy_ckpt(model_run, tmp_path / f"cut-{cut}")
        (ck / name).write_bytes(good.read_bytes()[:cut])
        if name != "training.safetensors":  # sampling does not read the training state
            rc, err = _sample(ck, tmp_path)
            _assert_error(rc, err, tmp_path, "corrupt")
        with pytest.raises(CondiffError, match="corrupt or truncated"):
            load_checkpoint(ck)
        tried.append(f"truncate {name}@{cut}")
    # a run whose newest checkpoint is damaged resumes from the one before, with a warning
    run = tmp_path / "run"
    shutil.copytree(model_run / "run", run)
    newest = latest_checkpoint(run)
    (newest / name).write_bytes((newest / name).read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        path, ck = load_latest_checkpoint(run)
    assert path.name == "step-0000002" and ck["step"] == 2
    record_property("bad_inputs", len(tried))


def test_hand_edited_checkpoints_name_the_problem(model_run, tmp_path, record_property):
    """Without the manifest (a checkpoint made by hand), config and shapes are still validated."""
    tried = []  # bad inputs this test tries, for the summary
    cases = {
        "not json": ("{ not json", "config.json is corrupt"),
        "no network": ('{"task": "diffusion"}', "no 'network' section"),
        "unknown kind": ('{"network": {"kind": "vit"}, "task": "diffusion"}', "unknown network kind"),
        "bad value": ('{"network": {"kind": "unet", "channels": ["x"]}, "task": "diffusion"}', "invalid unet config"),
    }
    for label, (text, needle) in cases.items():
        ck = _copy_ckpt(model_run, tmp_path / label.replace(" ", "-"))
        (ck / "SHA256SUMS").unlink()
        (ck / "config.json").write_text(text)
        rc, err = _sample(ck, tmp_path)
        _assert_error(rc, err, tmp_path, needle)
        tried.append(f"config: {label}")
    # a config whose widths do not match the weights: the message names the mismatched weight
    ck = _copy_ckpt(model_run, tmp_path / "shapes")
    (ck / "SHA256SUMS").unlink()
    config = json.loads((ck / "config.json").read_text())
    config["network"]["channels"] = [4, 12]
    (ck / "config.json").write_text(json.dumps(config))
    rc, err = _sample(ck, tmp_path)
    _assert_error(rc, err, tmp_path, "has shape", "config expects")
    assert re.search(r"weight \S+\.(weight|bias) has shape", err), err
    tried.append("config: widths that do not fit the weights")
    # and with the manifest kept, an edited config is caught as a checksum mismatch that says what to do
    ck = _copy_ckpt(model_run, tmp_path / "edited")
    (ck / "config.json").write_text((ck / "config.json").read_text().replace('"top"', '"TOP"'))
    rc, err = _sample(ck, tmp_path)
    _assert_error(rc, err, tmp_path, "SHA256SUMS", "write SHA256SUMS again")
    tried.append("config: edited under a manifest")
    record_property("bad_inputs", len(tried))


def _state_dict_pt(model_run: Path, dest: Path, suffix=".pt") -> Path:
    """A pickle-format state dict of the right shapes with a config.json beside it (as other tools ship)."""
    from safetensors.torch import load_file

    dest.mkdir()
    step = latest_checkpoint(model_run / "run")
    shutil.copy(step / "config.json", dest / "config.json")
    torch.save(load_file(str(step / "model.safetensors")), dest / f"model{suffix}")
    return dest / f"model{suffix}"


def test_pickle_files_are_refused_unless_trusted_and_never_run_code(model_run, tmp_path, record_property):
    tried = []  # bad inputs this test tries, for the summary
    pt = _state_dict_pt(model_run, tmp_path / "pt")
    for target in (pt, pt.parent):  # the file itself, or a folder holding only a pickle
        rc, err = _sample(target, tmp_path)
        _assert_error(rc, err, tmp_path, "refusing to load a pickle-based file", "--trust-pickle")
        tried.append(f"pickle without --trust-pickle ({'file' if target == pt else 'folder'})")
    # --trust-pickle: a plain state dict loads (weights-only unpickler) and samples exactly like safetensors
    rc, err = _sample(pt, tmp_path, "--trust-pickle", "--class", "top", "--seed", "3")
    assert rc == 0, err
    via_pickle = (tmp_path / "x.npz").read_bytes()
    rc, err = _sample(latest_checkpoint(model_run / "run"), tmp_path, "--class", "top", "--seed", "3")
    assert rc == 0, err
    assert np.array_equal(np.load(tmp_path / "x.npz")["images"], np.load(io.BytesIO(via_pickle))["images"])
    for f in ("x.png", "x.npz"):
        (tmp_path / f).unlink()
    # a malicious pickle is refused even with --trust-pickle, and its payload never runs
    marker = tmp_path / "PWNED"
    payloads = {
        "os.system": b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        "builtins.exec": b"cbuiltins\nexec\n(S'open(\"" + str(marker).encode() + b"\", \"w\")'\ntR.",
    }
    for label, payload in payloads.items():
        evil = tmp_path / "evil" / "model.pth"
        evil.parent.mkdir(exist_ok=True)
        shutil.copy(pt.parent / "config.json", evil.parent / "config.json")
        evil.write_bytes(payload)
        for extra in ((), ("--trust-pickle",)):
            rc, err = _sample(evil, tmp_path, *extra)
            _assert_error(rc, err, tmp_path)
            assert not marker.exists(), f"{label} ran"
            tried.append(f"malicious pickle ({label}){' with --trust-pickle' if extra else ''}")
    # a whole pickled module (not a state dict) is refused too
    torch.save(torch.nn.Linear(2, 2), evil)
    rc, err = _sample(evil, tmp_path, "--trust-pickle")
    _assert_error(rc, err, tmp_path, "not a plain state dict")
    # a pickle renamed to .safetensors is never unpickled; the error says what it is
    ck = _copy_ckpt(model_run, tmp_path / "renamed")
    (ck / "SHA256SUMS").unlink()
    shutil.copy(pt, ck / "model.safetensors")
    rc, err = _sample(ck, tmp_path, "--trust-pickle")
    _assert_error(rc, err, tmp_path, "looks like a pickle-based torch.save file")
    tried.extend(["pickled module with --trust-pickle", "pickle renamed to .safetensors"])
    record_property("bad_inputs", len(tried))


def test_full_disk_keeps_the_newest_checkpoint_and_resume_completes(tmp_path, monkeypatch, record_property):
    """ENOSPC in the middle of a checkpoint write: one-line error, the previous checkpoint intact, resume works."""
    tried = []  # bad inputs this test tries, for the summary
    data = write_npz(tmp_path / "shapes.npz", shapes_dataset(64))
    args = ["train", "--data", data, "--out", tmp_path / "run", "--steps", "6", "--batch-size", "16",
            "--ckpt-every", "2", "--log-every", "1", "--seed", "2", *TINY]
    real_save, calls = checkpoints.save_file, []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # the second checkpoint's first file
            Path(filename).write_bytes(b"\0" * 10)
            raise OSError(28, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    rc, _, err = run_cli_inprocess(args)
    assert_one_line_error(_Proc(rc, err))
    assert "No space left on device" in err
    assert _newest_step(tmp_path / "run") == 2 and load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 2
    monkeypatch.setattr(checkpoints, "save_file", real_save)
    rc, _, err = run_cli_inprocess(args)
    assert rc == 0, err
    rc, _, err = run_cli_inprocess([a if a != tmp_path / "run" else tmp_path / "ref" for a in args])
    assert rc == 0, err
    for name in ("model.safetensors", "training.safetensors"):
        assert _sha(latest_checkpoint(tmp_path / "run") / name) == _sha(latest_checkpoint(tmp_path / "ref") / name)
    assert not any(p.name.startswith(".") for p in (tmp_path / "run" / "checkpoints").iterdir())
    tried.append("disk full during a checkpoint write")
    record_property("bad_inputs", len(tried))


def test_no_resume_starts_over_without_losing_or_mixing_the_old_run(tmp_path):
    """--no-resume used to keep the old, higher step-N folders, so pruning deleted the new run's checkpoints."""
    data = write_npz(tmp_path / "shapes.npz", shapes_dataset(64))
    args = ["train", "--data", data, "--out", tmp_path / "run", "--batch-size", "16", "--ckpt-every", "2",
            "--log-every", "1", "--keep", "1", *TINY]
    assert run_cli_inprocess([*args, "--steps", "6"])[0] == 0
    with pytest.warns(UserWarning, match="moved the previous checkpoints"):
        rc, out, err = run_cli_inprocess([*args, "--steps", "2", "--no-resume", "--seed", "5"])
    assert rc == 0, err
    assert latest_checkpoint(tmp_path / "run").name == "step-0000002"
    assert [r["step"] for r in _log(tmp_path / "run")] == [1, 2]
    (old,) = tmp_path.joinpath("run").glob("checkpoints.replaced-*")
    assert [p.name for p in (old).iterdir()] == ["step-0000006"]


# ------------------------------------------------------------------- one trainer per folder, preemption (issue 19)
def _wait_for(cond, what: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout  # a hang guard, not a timing assertion
    while not cond():
        assert time.monotonic() < deadline, f"waited for {what}: {log.read_text()[-2000:] if log.exists() else ''}"
        time.sleep(0.01)


def _logged(run: Path) -> int:
    return len(_log(run, strict=False))


@pytest.fixture(scope="module")
def forks():
    """One fork server for the lock and signal tests (torch is imported once)."""
    server = ForkServer(dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    yield server
    server.close()


def test_second_trainer_on_a_run_folder_fails_naming_the_first_and_a_stale_lock_is_taken_over(tmp_path, forks):
    data = write_npz(tmp_path / "shapes.npz", shapes_dataset(64))
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--batch-size", "8", "--ckpt-every", "5",
            "--log-every", "1", *TINY]
    pid = forks.run(tmp_path / "first.log", [*args, "--steps", "100000"])
    try:
        _wait_for(lambda: _logged(run) >= 1, "the first trainer's first step", tmp_path / "first.log")
        rc, _, err = run_cli_inprocess([*args, "--steps", "3", "--seed", "5"])
    finally:
        os.kill(pid, signal.SIGKILL)  # the holder dies without releasing: its lock file stays behind
        assert forks.wait(pid) == -signal.SIGKILL
    assert_one_line_error(_Proc(rc, err))
    assert f"pid {pid}" in err and "in use by another trainer" in err, err
    assert json.loads((run / ".lock").read_text())["pid"] == pid  # a stale record names the dead trainer
    rc, _, err = run_cli_inprocess([*args, "--steps", str(_newest_step(run) + 2)])
    assert rc == 0, err  # taken over: the dead holder no longer blocks the folder
    log_steps = [r["step"] for r in _log(run)]
    assert log_steps == sorted(set(log_steps)), "duplicate or unordered steps in metrics.jsonl"
    assert not (run / ".lock").exists()  # released cleanly at the end


def test_sigterm_and_sigint_finish_the_step_write_a_checkpoint_and_lose_nothing(tmp_path, forks):
    data = write_npz(tmp_path / "shapes.npz", shapes_dataset(64))
    steps = 30
    args = ["train", "--data", str(data), "--batch-size", "8", "--ckpt-every", "1000", "--log-every", "1",
            "--steps", str(steps), "--lr-schedule", "cosine", "--seed", "3", *TINY]
    assert forks.wait(forks.run(tmp_path / "ref.log", [*args, "--out", str(tmp_path / "ref")])) == 0
    keys = ("step", "loss", "lr", "grad_norm")
    for sig, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
        run, log = tmp_path / sig.name, tmp_path / f"{sig.name}.log"
        pid = forks.run(log, [*args, "--out", str(run)])
        _wait_for(lambda: _logged(run) >= 3, "three logged steps", log)
        os.kill(pid, sig)
        assert forks.wait(pid) == code, log.read_text()[-2000:]
        stopped_at = _newest_step(run)  # no regular checkpoint before step 1000: this one is the signal's
        assert 3 <= stopped_at < steps, log.read_text()[-2000:]
        assert _logged(run) == stopped_at  # every logged step is in the checkpoint: nothing to redo
        assert f"stopped by {sig.name} after step {stopped_at}" in log.read_text()
        assert forks.wait(forks.run(log, [*args, "--out", str(run)])) == 0  # resume to the end
        a, b = latest_checkpoint(run), latest_checkpoint(tmp_path / "ref")
        assert a.name == b.name == f"step-{steps:07d}"
        for name in ("model.safetensors", "training.safetensors"):
            assert _sha(a / name) == _sha(b / name), (sig.name, name)
        assert [{k: r[k] for k in keys} for r in _log(run)] == [{k: r[k] for k in keys} for r in _log(tmp_path / "ref")]
