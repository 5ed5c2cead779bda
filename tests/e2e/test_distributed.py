"""Data-parallel training over MPI (convdsl.distributed): `mpirun -n 2` and `-n 3` (uneven
shards) give, step for step, the parameters of one process training on the whole batch; a
checkpoint written by rank 0 loads in a single process; a rank that dies or hangs stops the
others within a bounded time, and training resumed from a checkpoint continues the same
trajectory. Each test runs tests/mpi_worker.py under the mpich wheel's mpiexec, one OpenMP
thread per rank; the reference is the same network trained here, in one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import convdsl
from convdsl.distributed import find_mpiexec, shard_bounds
from mpi_worker import batch_for
from reference import F32, F64, assert_close

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "mpi_worker.py"

# No batchnorm or dropout: with them a shard's forward differs from the whole batch's (each
# rank normalises with its own shard's statistics, as in PyTorch DDP), so only these match.
CONV_NET = """
network Dist{tag} {{
    dtype {dtype}
    input x: [2, 6, 6]
    f = x -> conv(4, kernel=3, pad=same) -> relu -> maxpool(2) -> flatten -> dense(8) -> tanh -> dense(3)
    output f
    loss softmax_cross_entropy(f)
}}
"""
# Batchnorm on the input, so that the running statistics' reference is the batch's own.
BN_NET = """
network DistBN {
    input x: [2, 6, 6]
    f = x -> batchnorm(momentum=0.25) -> conv(3, kernel=3) -> relu -> flatten -> dense(3)
    output f
    loss softmax_cross_entropy(f)
}
"""
NETS = {"f32": CONV_NET.format(dtype="f32", tag="F32"), "f64": CONV_NET.format(dtype="f64", tag="F64"), "bn": BN_NET}
BATCH, CLASSES, LR = 7, 3, 0.1
OPTIMIZER = {"momentum": 0.9, "weight_decay": 1e-3}   # state (momentum buffers) that checkpoints carry


@pytest.fixture(scope="module")
def modules():
    # Compiled here first: the ranks then find every module in this run's build cache.
    return {name: convdsl.load_source(src) for name, src in NETS.items()}


def run_ranks(ranks: int, tmp_path: Path, nets, steps: int, limit: float = 120, **spec):
    mpiexec = find_mpiexec()
    assert mpiexec, "no mpiexec: pip install -e '.[distributed]' installs the mpich wheel's"
    spec = {"nets": {n: NETS[n] for n in nets}, "steps": steps, "batch": BATCH, "classes": CLASSES, "lr": LR,
            "optimizer": OPTIMIZER, "out": str(tmp_path), **spec}
    spec_path = tmp_path / f"spec{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    proc = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, str(WORKER), str(spec_path)],
                          capture_output=True, text=True, timeout=limit, env=env, cwd=tmp_path)
    return proc, time.monotonic() - start


def reference_trajectory(module, steps: int):
    """Parameters after each step of one process training on every whole batch."""
    net = module.Model(seed=0)
    dtype = np.dtype({"f32": np.float32, "f64": np.float64}[module.META["dtype"]])
    shape = tuple(module.META["inputs"][0]["dims"])
    trajectory = []
    for step in range(1, steps + 1):
        x, y = batch_for(step, BATCH, shape, CLASSES, dtype)
        loss = net.train_step(x, y, lr=LR, **OPTIMIZER)
        trajectory.append(({k: v.copy() for k, v in net.params.items()}, loss))
    return trajectory


def assert_follows(tmp_path: Path, name: str, reference, steps, tolerance):
    with np.load(tmp_path / f"{name}.trajectory.npz") as got:
        for step in steps:
            params, loss = reference[step - 1]
            assert_close(got[f"{step}:loss"], loss, what=f"{name} loss, step {step}", **tolerance)
            for k, v in params.items():
                assert_close(got[f"{step}:{k}"], v, what=f"{name} {k}, step {step}", **tolerance)


def assert_ranks_identical(tmp_path: Path, name: str, ranks: int):
    with np.load(tmp_path / f"{name}.rank0.npz") as first:
        for r in range(1, ranks):
            with np.load(tmp_path / f"{name}.rank{r}.npz") as other:
                for k in first.files:
                    np.testing.assert_array_equal(other[k], first[k], err_msg=f"{name} {k}: rank {r} differs from rank 0")


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_train_as_one_process_on_the_whole_batch(ranks, modules, tmp_path):
    """Batch 7 is split 4+3 or 3+2+2; each shard's gradient is weighted by its share. On 3
    ranks the f64 network is given each rank's own rows only (local=True), split 1+0+6: the
    ranks find the total, and a rank with no samples adds nothing. On 2 ranks the gradient
    block goes in buckets of 256 bytes (dozens of messages), on 3 in one."""
    steps = 4
    proc, _ = run_ranks(ranks, tmp_path, ["f32", "f64"], steps, local={"f64": [1, 0, 6]} if ranks == 3 else {},
                        bucket_bytes=256 if ranks == 2 else 25 << 20)
    assert proc.returncode == 0, proc.stderr
    for name, tolerance in (("f32", F32), ("f64", F64)):
        reference = reference_trajectory(modules[name], steps)
        assert_follows(tmp_path, name, reference, range(1, steps + 1), tolerance)
        assert_ranks_identical(tmp_path, name, ranks)
        # What rank 0 saved loads in a single process, as the trained model.
        net = modules[name].Model(seed=5)
        net.load(tmp_path / f"{name}.saved.npz")
        for k, v in reference[-1][0].items():
            assert_close(net.params[k], v, what=f"{name} {k} loaded", **tolerance)


def test_batchnorm_running_statistics_are_averaged_over_the_shards(modules, tmp_path):
    """One step: the running mean is the whole batch's, the variance the shards' weighted mean;
    then an eval-mode compute_grads leaves them as they are (the worker checks)."""
    ranks, momentum = 3, 0.25
    proc, _ = run_ranks(ranks, tmp_path, ["bn"], steps=1, eval_step=True)
    assert proc.returncode == 0, proc.stderr
    x, _ = batch_for(1, BATCH, (2, 6, 6), CLASSES, np.float32)
    x = x.astype(np.float64)
    shards = [x[slice(*shard_bounds(BATCH, ranks, r))] for r in range(ranks)]
    weights = [len(s) / BATCH for s in shards]
    mean = x.mean(axis=(0, 2, 3))
    var = sum(w * s.var(axis=(0, 2, 3), ddof=1) for w, s in zip(weights, shards))
    assert_ranks_identical(tmp_path, "bn", ranks)
    with np.load(tmp_path / "bn.rank0.npz") as got:
        name = [k for k in got.files if k.endswith("running_mean")][0].rsplit(".", 1)[0]
        assert_close(got[f"{name}.running_mean"], momentum * mean, **F32)
        assert_close(got[f"{name}.running_var"], (1 - momentum) + momentum * var, **F32)


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_job_and_a_checkpoint_resumes_it(modules, tmp_path):
    """Rank 1 is killed before step 5 of 6 (checkpoints after steps 2 and 4): mpirun ends every rank;
    resumed from the checkpoint, training reaches step 6 on the uninterrupted trajectory."""
    proc, seconds = run_ranks(2, tmp_path, ["f32"], steps=6, checkpoint_every=2, fault={"rank": 1, "step": 5, "how": "kill"})
    assert proc.returncode != 0
    assert seconds < 60
    assert "BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES" in proc.stdout + proc.stderr    # mpiexec's words
    assert json.loads((tmp_path / "f32.checkpoint.npz.json").read_text())["step"] == 4
    assert not (tmp_path / "f32.trajectory.npz").exists()        # rank 0 never finished
    reference = reference_trajectory(modules["f32"], 6)
    # The checkpoint is the model after step 4, momentum buffers included, for one process too.
    net = modules["f32"].Model(seed=3)
    net.load(tmp_path / "f32.checkpoint.npz")
    assert net.optimizer_state
    for k, v in reference[3][0].items():
        assert_close(net.params[k], v, what=f"checkpoint {k}", **F32)
    proc, _ = run_ranks(2, tmp_path, ["f32"], steps=6, resume=True)
    assert proc.returncode == 0, proc.stderr
    assert_follows(tmp_path, "f32", reference, [5, 6], F32)
    with np.load(tmp_path / "f32.trajectory.npz") as got:
        assert "4:loss" not in got.files                          # it did start after step 4


def test_a_rank_that_hangs_makes_the_others_stop_with_a_clear_error(modules, tmp_path):
    proc, seconds = run_ranks(2, tmp_path, ["f32"], steps=3, limit=60, timeout=2.0,
                              fault={"rank": 1, "step": 2, "how": "hang"})
    assert proc.returncode != 0
    assert seconds < 30
    assert "rank 0 of 2: the gradient Allreduce of step 2 did not complete within 2 s" in proc.stderr
    assert "aborting every rank" in proc.stderr


@pytest.mark.slow
def test_train_digits_runs_distributed_under_mpirun(tmp_path, optimised):
    """The README's command: `mpirun -n 2 python examples/train_digits.py --distributed` (here
    for 3 epochs): rank 0 alone prints and saves, and the model it saved has learnt."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, str(REPO / "examples" / "train_digits.py"),
                           "--distributed", "--epochs", "3", "--out", str(tmp_path / "build")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == 3          # one rank's log, not two
    [result] = [line for line in lines if line.startswith("held-out accuracy: ")]
    assert float(result.split(":")[1].split("%")[0]) > 80, result
    assert (tmp_path / "build" / "digitslenet.npz").is_file()



def test_ranks_started_with_different_networks_stop_at_once(modules, tmp_path):
    proc, _ = run_ranks(3, tmp_path, ["f32"], steps=1, other_net_on=[2], other_net=NETS["f64"])
    assert proc.returncode != 0
    assert "DistributedError: ranks [2] hold a different network (or dtype) than rank 0" in proc.stderr


# ---- in this process, a world of one rank (mpi4py starts MPI without mpirun) -------------------
def test_flat_views_are_the_models_memory(modules):
    from convdsl.distributed import flat_views
    net = modules["bn"].Model(seed=0)
    params, grads, buffers = flat_views(net)
    grads[...] = 7
    buffers[...] = 3
    params[...] = -1
    assert all((g == 7).all() for g in net.grads.values())
    assert all((b == 3).all() for b in net.buffers.values())
    assert all((p == -1).all() for p in net.params.values())
    assert grads.size >= sum(g.size for g in net.grads.values())


@pytest.mark.parametrize("batch, ranks", [(7, 2), (7, 3), (2, 3), (64, 5)])
def test_shards_split_a_batch_as_array_split(batch, ranks):
    rows = np.arange(batch)
    assert [list(rows[slice(*shard_bounds(batch, ranks, r))]) for r in range(ranks)] == \
        [list(part) for part in np.array_split(rows, ranks)]


def test_checkpoint_and_resume_on_one_rank(modules, tmp_path):
    from convdsl.distributed import DistributedError, DistributedModel
    net = modules["f32"].Model(seed=0)
    dist = DistributedModel(net, abort_on_error=False)
    x, y = batch_for(1, BATCH, (2, 6, 6), CLASSES, np.float32)
    dist.train_step(x, y, lr=LR, **OPTIMIZER)
    dist.checkpoint(tmp_path / "ckpt", step=1)                 # .npz added, as np.savez does
    saved = {**net.state_dict(), **{k: v.copy() for k, v in net.optimizer_state.items()}}
    dist.train_step(x, y, lr=LR, **OPTIMIZER)
    assert dist.resume(tmp_path / "ckpt.npz") == 1
    now = {**net.state_dict(), **net.optimizer_state}
    assert saved.keys() == now.keys() and all(np.array_equal(saved[k], now[k]) for k in saved)
    assert dist.resume(tmp_path / "none.npz", missing_ok=True) == 0
    with pytest.raises(DistributedError, match="reading the checkpoint .*none.npz failed on rank 0: FileNotFoundError"):
        dist.resume(tmp_path / "none.npz")
