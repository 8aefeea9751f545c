"""Issue 8: data-parallel training and sharded sampling under torchrun (2 gloo processes on CPU), GPU options.

The torchrun runs are compared with the same command run in one process: the
weights must agree within float tolerance (DDP averages gradients in another
order), the sampled images exactly.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from condiff import cli
from condiff.checkpoints import load_checkpoint, load_model
from condiff.distributed import Shard, launch, shard_range, torchrun_env
from condiff.errors import CondiffError
from condiff.nets import UNet
from condiff.schedule import cosine_schedule
from condiff.training import DiffusionTask, TrainConfig, train
from helpers import shapes_dataset, write_npz


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(args) -> int:
    """The same command in this process (the single-process reference)."""
    return cli.main([str(a) for a in args])


def _train_args(data, out, steps, command="train"):
    """A tiny run: global batch 8 (4 per rank under torchrun), a checkpoint every 2 steps."""
    task = ["--p-uncond", "0.3"] if command == "train" else ["--t-max", "40"]
    return [command, "--data", data, "--out", out, "--steps", steps, "--batch-size", "8", "--channels", "8,16",
            "--T", "50", "--ckpt-every", "2", "--keep", "10", "--log-every", "1", "--warmup", "2", "--no-progress",
            "--device", "cpu", *task]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _assert_same_checkpoint(a, b, atol=1e-5):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["step"] == cb["step"]
    for part in ("raw", "weights"):  # raw weights and EMA weights
        for k in ca[part]:
            assert torch.allclose(ca[part][k], cb[part][k], atol=atol, rtol=1e-4), (part, k)
    for k, v in ca["optimizer"]["state"].items():
        assert torch.allclose(v["exp_avg"], cb["optimizer"]["state"][k]["exp_avg"], atol=atol)
    assert torch.equal(ca["rng"]["generator"], cb["rng"]["generator"])


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("data") / "shapes.npz", shapes_dataset(64, size=8))


# ----------------------------------------------------------------------------- without processes
def test_shard_draws_union_equals_the_single_process_draw():
    world = 3
    single = Shard()
    g = torch.Generator().manual_seed(5)
    ref = (single.randint(50, 12, g), single.randn((12, 1, 4, 4), g), single.rand(12, g))
    after = g.get_state()
    parts = []
    for r in range(world):
        g = torch.Generator().manual_seed(5)
        sh = Shard(r, world)
        parts.append((sh.randint(50, 4, g), sh.randn((4, 1, 4, 4), g), sh.rand(4, g)))
        assert torch.equal(g.get_state(), after)  # every rank's generator stays in step with one process
    for i in range(3):
        rebuilt = torch.empty_like(ref[i])
        for r in range(world):
            rebuilt[r::world] = parts[r][i]
        assert torch.equal(rebuilt, ref[i])


def test_shard_range_splits_whole_batches_in_order():
    for n in (1, 5, 9, 10, 23):
        for bs in (1, 3, 4, 10):
            for world in (1, 2, 3, 5):
                ranges = [shard_range(n, bs, r, world) for r in range(world)]
                pos = 0
                for start, count in ranges:
                    assert start == pos and count >= 0
                    assert start % bs == 0 or count == 0
                    pos += count
                assert pos == n
                batches = [-(-c // bs) for _, c in ranges]  # batches per rank differ by at most one
                assert max(batches) - min(batches) <= 1


def test_global_batch_must_divide_into_ranks(tmp_path):
    data = shapes_dataset(32, size=8)
    model = UNet(in_channels=1, image_size=8, channels=(8, 16), blocks=1)
    cfg = TrainConfig(steps=2, batch_size=9)
    with pytest.raises(CondiffError, match="not divisible by the 2 processes"):
        train(model, DiffusionTask(cosine_schedule(50)), data, cfg, tmp_path / "run", rank=1, world_size=2,
              progress=False)
    assert not (tmp_path / "run").exists()


def test_task_without_shard_support_is_refused_for_several_processes(tmp_path):
    class Plain:
        name = "plain"

        def config(self):
            return {"task": "plain"}

        def loss(self, model, x0, y, generator):
            return model(x0, torch.zeros(len(x0), dtype=torch.long)).pow(2).mean(), {}

    model = UNet(in_channels=1, image_size=8, channels=(8, 16), blocks=1)
    with pytest.raises(CondiffError, match="plain training does not support several processes"):
        train(model, Plain(), shapes_dataset(32, size=8), TrainConfig(steps=1, batch_size=8), tmp_path,
              rank=0, world_size=2, progress=False)


def test_torchrun_environment_is_read_and_checked(monkeypatch):
    assert torchrun_env({}) is None
    d = torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.main, d.active) == (3, 4, 1, False, True)
    with pytest.raises(CondiffError, match="inconsistent"):
        torchrun_env({"RANK": "4", "WORLD_SIZE": "4"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CondiffError, match="condiff export does not run as several processes"):
        with launch("cpu", "export", supported=False):
            pass


# ----------------------------------------------------------------------------- two gloo processes
SAMPLE = ["sample", "--per-class", "5", "--class", "left", "--class", "top", "--sampler", "ddpm", "--steps", "8",
          "--batch-size", "3", "--seed", "3", "--no-progress", "--device", "cpu"]
# classifier guidance on the null branch, 2 x 3 images in batches of 2: each row's class travels in the
# batch condition, so the ranks' batches cut across the classes (batch 1 holds a "left" and a "top" row)
GUIDED = ["sample", "--unconditional", "--class", "left", "--class", "top", "--scale", "2", "--per-class", "3",
          "--sampler", "ddpm", "--steps", "5", "--batch-size", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, npz):
    """One torchrun job of 2 gloo processes runs four commands; the same commands then run in this process.

    torchrun: train 4 steps (the command opens its own process group), resume it to 6
    steps, train a classifier 3 steps, sample 2 x 5 images in batches of 3 (ranks
    take batches {0, 1} and {2, 3}; DDPM adds noise at every step).
    """
    root = tmp_path_factory.mktemp("ddp")
    two, one = root / "two", root / "one"
    commands = [_train_args(npz, two / "diff", 4), _train_args(npz, two / "diff", 6),
                _train_args(npz, two / "clf", 3, "train-classifier"),
                [*SAMPLE, "--ckpt", two / "diff", "--out", two / "s.png", "--npz", two / "s.npz"],
                [*GUIDED, "--ckpt", two / "diff", "--classifier", two / "clf", "--out", two / "g.png",
                 "--npz", two / "g.npz"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    worker = os.path.join(os.path.dirname(__file__), "torchrun_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", worker,
           json.dumps([[str(a) for a in c] for c in commands]), str(_free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert one_process(_train_args(npz, one / "diff", 6)) == 0
    assert one_process(_train_args(npz, one / "clf", 3, "train-classifier")) == 0
    assert one_process([*SAMPLE, "--ckpt", two / "diff", "--out", one / "s.png", "--npz", one / "s.npz"]) == 0
    assert one_process([*GUIDED, "--ckpt", two / "diff", "--classifier", two / "clf", "--out", one / "g.png",
                        "--npz", one / "g.npz"]) == 0
    return {"one": one, "two": two, "stdout": proc.stdout}


def _log(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(runs):
    """Same weights, EMA weights, Adam state and generator after 2 and 4 steps as one process."""
    for step in (2, 4):
        _assert_same_checkpoint(runs["two"] / "diff" / "checkpoints" / f"step-{step:07d}",
                                runs["one"] / "diff" / "checkpoints" / f"step-{step:07d}")


def test_two_processes_resume_like_one(runs):
    """Stopped at 4 and resumed to 6 under torchrun: the same as one process straight to 6."""
    _assert_same_checkpoint(runs["two"] / "diff" / "checkpoints" / "step-0000006",
                            runs["one"] / "diff" / "checkpoints" / "step-0000006")
    one, two = _log(runs["one"] / "diff"), _log(runs["two"] / "diff")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, two):  # the logged loss is the global batch's mean, as in one process
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_only_rank_zero_writes(runs):
    one, two = runs["one"], runs["two"]
    assert _files(two / "diff") == _files(one / "diff")  # one checkpoint folder per step, one log
    assert _files(two / "clf") == _files(one / "clf")
    assert sorted(p.name for p in two.iterdir()) == ["clf", "diff", "g.npz", "g.png", "s.npz", "s.png"]
    assert runs["stdout"].count("final checkpoint") == 3  # 2 train + 1 train-classifier, rank 0 only
    assert runs["stdout"].count("held-out accuracy") == 1 and runs["stdout"].count("wrote") == 4


def test_two_processes_train_a_classifier_like_one(runs):
    _assert_same_checkpoint(runs["two"] / "clf" / "checkpoints" / "step-0000003",
                            runs["one"] / "clf" / "checkpoints" / "step-0000003")
    for a, b in zip(_log(runs["one"] / "clf"), _log(runs["two"] / "clf")):
        # accuracy counts are summed over the ranks before logging
        assert {k: v for k, v in a.items() if k.startswith("acc_")} == {k: v for k, v in b.items()
                                                                         if k.startswith("acc_")}


def test_sharded_sampling_equals_one_process(runs):
    for name, n in (("s.npz", 10), ("g.npz", 6)):
        a, b = np.load(runs["one"] / name), np.load(runs["two"] / name)
        assert a["images"].shape == (n, 8, 8, 1)
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])


# ----------------------------------------------------------------------------- GPU options on CPU
def test_bf16_autocast_lowers_the_networks_only():
    from condiff.accel import autocast

    model = UNet(in_channels=1, image_size=8, channels=(8, 16), blocks=1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with autocast("cpu", True):
        assert model(x, t).dtype == torch.bfloat16
    with autocast("cpu", False):
        assert model(x, t).dtype == torch.float32


def test_bf16_flag_trains_and_samples_on_cpu(tmp_path, npz, capsys):
    base = _train_args(npz, tmp_path / "run", 2)
    assert one_process([*base, "--bf16"]) == 0
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000002")
    assert ck["config"]["train"]["bf16"] is True
    assert one_process([*_train_args(npz, tmp_path / "fp32", 2)]) == 0
    l16, l32 = ([json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
                for r in ("run", "fp32"))
    assert l16 != l32 and l16 == pytest.approx(l32, rel=0.05)  # bf16 forward: other rounding, same loss
    sample = ["sample", "--ckpt", tmp_path / "run", "--per-class", "4", "--class", "top", "--steps", "5",
              "--no-progress", "--device", "cpu"]
    assert one_process([*sample, "--bf16", "--out", tmp_path / "b.png", "--npz", tmp_path / "b.npz"]) == 0
    assert one_process([*sample, "--out", tmp_path / "f.png", "--npz", tmp_path / "f.npz"]) == 0
    b, f = (np.load(tmp_path / n)["images"].astype(int) for n in ("b.npz", "f.npz"))
    assert np.abs(b - f).max() <= 16  # the same images up to bf16 rounding of the network


def test_compiled_model_trains_and_checkpoints_plain_weights(tmp_path):
    from condiff.accel import compile_model

    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, channels=(8, 16), blocks=1, num_classes=2)
    compiled = compile_model(net, backend="eager")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 5, 9])
    assert torch.equal(compiled(x, t, None), net(x, t, None))
    assert compiled.conditional and compiled.null_cond(2).tolist() == [2, 2]
    cfg = TrainConfig(steps=2, batch_size=8, ckpt_every=2, log_every=1)
    final = train(compiled, DiffusionTask(cosine_schedule(50), 0.2), shapes_dataset(32, size=8), cfg, tmp_path,
                  progress=False)
    loaded, _ = load_model(final)  # names without torch.compile's "_orig_mod." prefix
    raw = load_checkpoint(final)["raw"]
    assert set(raw) == set(net.state_dict())
    assert all(torch.equal(raw[k], v) for k, v in net.state_dict().items())
    assert compile_model(net, enabled=False) is net
