"""One rank of the distributed tests (tests/e2e/test_distributed.py), run under mpirun:

    mpirun -n 2 python tests/mpi_worker.py SPEC.json

SPEC says which networks to train (their source; the test process compiled them already, so
every rank finds them in the shared build cache), for how many steps, on which batches, with
which optimizer, and what fault to stage. Every rank trains with DistributedModel on the same
whole batches, `batch_for(step)`, which the test uses for its single-process reference too.
Rank 0 writes each network's parameters after every step to OUT/<net>.trajectory.npz; every
rank writes its final parameters and buffers to OUT/<net>.rank<r>.npz.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np


def batch_for(step: int, batch: int, input_shape, classes: int, dtype):
    """The whole batch of step `step` (1-based): the same on every rank and in the reference."""
    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((batch, *input_shape)).astype(dtype)
    y = rng.integers(0, classes, size=batch)
    return x, y


def main(spec_path: str) -> None:
    import convdsl
    from convdsl.distributed import DistributedModel

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    fault = spec.get("fault") or {}
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.Get_rank()
    for name, source in spec["nets"].items():
        if rank in spec.get("other_net_on", ()):     # a rank started with another network
            source = spec["other_net"]
        module = convdsl.load_source(source)
        dtype = np.dtype({"f32": np.float32, "f64": np.float64}[module.META["dtype"]])
        input_shape = tuple(module.META["inputs"][0]["dims"])
        # Each rank starts from its own seed: the broadcast from rank 0 must make them equal.
        net = module.Model(seed=rank)
        # Start-up (imports, loading the module) and the steps may keep a rank busy for a while
        # on a loaded machine: the spec's deadline starts at the step of the staged fault.
        dist = DistributedModel(net, timeout=120.0, bucket_bytes=spec.get("bucket_bytes", 25 << 20))
        checkpoint = out / f"{name}.checkpoint.npz"
        start = dist.resume(checkpoint) if spec.get("resume") else 0
        trajectory = {}
        for step in range(start + 1, spec["steps"] + 1):
            if fault.get("step") == step:
                dist.timeout = spec.get("timeout", 60.0)
            if fault.get("rank") == rank and fault.get("step") == step:
                if fault["how"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)    # as a crash, or the OOM killer, would
                time.sleep(fault.get("seconds", 600))
            x, y = batch_for(step, spec["batch"], input_shape, spec["classes"], dtype)
            split = spec.get("local", {}).get(name)
            if split:                   # each rank is given only its own rows, split[r] of them
                mine = slice(sum(split[:rank]), sum(split[:rank + 1]))
                loss = dist.train_step(x[mine], y[mine], lr=spec["lr"], local=True, **spec.get("optimizer", {}))
            else:                       # every rank is given the whole batch and takes its shard
                loss = dist.train_step(x, y, lr=spec["lr"], **spec.get("optimizer", {}))
            trajectory.update({f"{step}:{k}": v.copy() for k, v in net.params.items()})
            trajectory[f"{step}:loss"] = np.array(loss)
            if spec.get("checkpoint_every") and step % spec["checkpoint_every"] == 0:
                dist.checkpoint(checkpoint, step)
        if spec.get("eval_step"):
            # An eval-mode forward leaves the running statistics as they are, on every rank.
            before = {k: v.copy() for k, v in net.buffers.items()}
            net.eval()
            dist.compute_grads(*batch_for(spec["steps"] + 1, spec["batch"], input_shape, spec["classes"], dtype))
            net.train()
            if any(not np.array_equal(before[k], v) for k, v in net.buffers.items()):
                raise SystemExit(f"rank {rank}: an eval-mode step changed the running statistics of {name}")
        if not dist.in_sync():
            raise SystemExit(f"rank {rank}: the ranks' parameters differ after training {name}")
        if dist.is_root:
            np.savez(out / f"{name}.trajectory.npz", **trajectory)
        dist.save(out / f"{name}.saved.npz")
        np.savez(out / f"{name}.rank{rank}.npz", **net.state_dict())


if __name__ == "__main__":
    main(sys.argv[1])
