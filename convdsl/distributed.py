"""Data-parallel training over MPI: one generated Model per process, gradients averaged.

    from convdsl.distributed import DistributedModel
    net = module.Model(seed=0)
    dist = DistributedModel(net)                    # rank 0's state broadcast to every rank
    for x, y in batches:                            # the same whole batch on every rank
        loss = dist.train_step(x, y, lr=0.1)        # each rank takes its shard of it

Run it as `mpirun -n 4 python train.py`. Every rank holds the same model. Each step each rank
runs `net.compute_grads` (forward in training mode, the loss, backward) on its shard of the
batch; the gradient blocks are summed with MPI Allreduce in place, each rank's weighted by its
share of the batch, so that uneven shards give exactly the whole batch's mean gradient; every
rank then applies the same `net.update`, so the parameters stay identical.

- **Zero copy.** A generated module keeps all parameter gradients in one contiguous block
  (`m->grads`, laid out like `m->params`), and likewise the parameters and the buffers. The
  Allreduce works on numpy views of those blocks (`flat_views`): no gradient is copied or
  packed. The block is cut into buckets of at most `bucket_bytes` (default 25 MiB, PyTorch
  DDP's), each one nonblocking Iallreduce, all in flight at once: a small network sends one
  message per step, not one per parameter.
- **Batchnorm's running statistics are averaged**, weighted like the gradients (PyTorch DDP
  instead broadcasts rank 0's at each forward). The running mean is then exactly the one a
  single process would have after a forward over the whole batch (it is linear in the
  batch's mean); the running variance is the weighted mean of the shards' unbiased variances,
  which lacks the spread between the shards' means. The batch statistics a training-mode
  forward normalises with are each shard's own, as in DDP without SyncBatchNorm, so a network
  with batchnorm trains like one with a smaller batch per rank, not exactly like one process.
- **Dropout** draws from each model's own seed: give each rank its own,
  `Model(seed=seed + rank)`, or every rank drops the same positions of different samples (the
  parameters are broadcast from rank 0 anyway, whatever the seed).
- **Faults.** Every collective is nonblocking and waited for with a deadline (`timeout`,
  default 300 s): a rank that hangs or has died makes the others raise `DistributedError`
  naming the step, instead of waiting for ever. By default (`abort_on_error=True`) an uncaught
  exception on any rank — that error, or any other — prints its traceback and calls
  `MPI_Abort`, which makes mpirun end every rank at once (mpirun also ends them all when one
  is killed). `checkpoint(path, step)` writes, from rank 0, the model's `.npz` (what
  `Model.save` writes, which `Model.load` reads in a single process) and the step it was
  taken after; `resume(path)` loads it on rank 0, broadcasts it, and returns that step.
- **State travels whole.** Creating a DistributedModel, and `resume`, give every rank rank 0's
  parameters, buffers and optimizer state (momentum buffers, Adam's moments and step count),
  sent as the .npz that `Model.save` writes and loaded by the others with `Model.load`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

DEFAULT_TIMEOUT = 300.0
DEFAULT_BUCKET_BYTES = 25 << 20
SPIN_SECONDS = 2e-3             # how long a wait polls MPI without pausing
ABORT_GRACE_SECONDS = 0.5       # for the launcher to forward what a failing rank wrote, before MPI_Abort


class DistributedError(RuntimeError):
    """A collective did not complete in time, or the ranks disagree (model, data, a file)."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("convdsl.distributed needs mpi4py and an MPI library: "
                          "pip install -e '.[distributed]' (mpi4py and the mpich wheel)") from e
    return MPI


def find_mpiexec() -> str | None:
    """The `mpiexec` of the environment this Python runs in (the mpich wheel installs it beside
    the interpreter), else the first one on PATH; None when there is none."""
    import sysconfig
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(folder, "mpiexec")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("mpiexec") or shutil.which("mpirun")


def shard_bounds(batch: int, size: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of a batch of `batch` samples that rank `rank` of `size` takes: the
    first `batch % size` ranks take one sample more (numpy's array_split)."""
    base, extra = divmod(batch, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _span(views) -> np.ndarray:
    """One 1-D view over the memory that `views` cover, from the first to the end of the last
    (the generated module starts each array on a 64-byte boundary: the gaps between them are
    padding of the same block); empty when there are none. The views must be numpy views into
    one block of the model's memory, in order and not overlapping, which is checked."""
    views = [v for v in views if v.size]
    if not views:
        return np.empty(0)
    itemsize = views[0].itemsize
    for before, after in zip(views, views[1:]):
        if _address(after) < _address(before) + before.nbytes:
            raise DistributedError("the model's arrays are not laid out in order in one block")
    if not all(v.flags.c_contiguous for v in views):
        raise DistributedError("the model's arrays are not contiguous")
    first, start = views[0], _address(views[0])
    count, rest = divmod(_address(views[-1]) + views[-1].nbytes - start, itemsize)
    if rest:
        raise DistributedError("the model's arrays are not aligned to their element size")
    # A view of `first`'s memory stretched over the block: it keeps the model alive, as `first` does.
    return np.lib.stride_tricks.as_strided(first.reshape(-1), shape=(count,), strides=(itemsize,))


def flat_views(net) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's parameters, gradients and buffers, each as one 1-D numpy view of its block
    (no copy). The gradient block (`m->grads`) is laid out like the parameter block: the view
    spans the trainable parameters' gradients, and the slots of frozen parameters (and the
    padding) inside it stay zero."""
    params = _span(list(net.params.values()))
    grads = _span(list(net.grads.values()))
    if net.grads:
        # Each gradient sits where its parameter sits in the parameter block: so the gradient
        # view, a part of the mirror image of the parameter view, lies inside the gradient block.
        first = next(iter(net.grads))
        g0, p0 = _address(net.grads[first]), _address(net.params[first])
        for name, g in net.grads.items():
            if _address(g) - g0 != _address(net.params[name]) - p0:
                raise DistributedError("the gradient block is not laid out like the parameter block")
    buffers = _span(list(net.buffers.values()))
    return params, grads, buffers


def _signature(net) -> bytes:
    """What every rank's model must share: the network, dtype, parameter and buffer shapes."""
    meta = net._meta
    text = json.dumps([meta["network"], meta["dtype"], meta["layout"], [list(map(str, p)) for p in meta["params"]],
                       [list(map(str, b)) for b in meta.get("buffers", ())]])
    return hashlib.sha256(text.encode()).digest()


class DistributedModel:
    """A Model trained data-parallel over the ranks of `comm` (default MPI.COMM_WORLD).

    `timeout` bounds every wait for the other ranks (seconds; None waits for ever; the
    attribute may be changed between steps);
    `bucket_bytes` bounds one Allreduce message; `abort_on_error` installs an excepthook that
    calls MPI_Abort after printing an uncaught exception, so that no rank waits for a dead
    one. Creating it is collective: every rank must create one, from the same network.
    """

    def __init__(self, net, comm=None, *, timeout: float | None = DEFAULT_TIMEOUT,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, abort_on_error: bool = True, root: int = 0):
        MPI = self._MPI = _mpi()
        self.net = net
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size, self.root = self.comm.Get_rank(), self.comm.Get_size(), root
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes!r}")
        self.timeout = timeout
        self.bucket_bytes = int(bucket_bytes)
        self.steps = 0                  # compute_grads calls so far: names the step in errors
        # Seconds spent so far in each part of a step: `local` (net.compute_grads on this
        # rank's shard), `allreduce` (weighting the gradients, then waiting for the Allreduce:
        # the slowest rank's lateness included) and `update` (net.update).
        self.timing = {"local": 0.0, "allreduce": 0.0, "update": 0.0}
        if abort_on_error:
            self._install_abort_hook()
        self.params, self.grads, self.buffers = flat_views(net)
        self._scalars = np.zeros(2)     # [this rank's samples, their summed loss], summed over ranks
        signatures = self._allgather_digest(_signature(net), "checking that every rank has the same network")
        if len(set(signatures)) != 1:
            odd = [r for r, s in enumerate(signatures) if s != signatures[self.root]]
            raise DistributedError(f"ranks {odd} hold a different network (or dtype) than rank {self.root}")
        self.broadcast_state()

    # ---- waiting with a deadline ---------------------------------------------------------
    def _wait(self, requests: list, what: str) -> None:
        """Wait for nonblocking `requests`; a DistributedError after `timeout` seconds."""
        Testall = self._MPI.Request.Testall
        if Testall(requests):
            return
        started = time.monotonic()
        deadline = None if self.timeout is None else started + self.timeout
        spin_until = started + SPIN_SECONDS
        pause = 0.0
        while not Testall(requests):
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise DistributedError(
                    f"rank {self.rank} of {self.size}: {what} did not complete within {self.timeout:g} s; "
                    f"another rank has died, hangs, or is that far behind (DistributedModel(timeout=...))")
            # MPI progresses a nonblocking collective inside Test: poll without a pause while
            # it is likely to complete soon (as MPI's own Wait would), then every millisecond
            # or so, to leave the core to a rank that is still computing.
            if now > spin_until:
                time.sleep(pause)
                pause = min(1e-3, pause + 5e-5)

    def _allgather_digest(self, digest: bytes, what: str) -> list[bytes]:
        """Every rank's 32-byte digest, in rank order."""
        mine = np.frombuffer(digest, dtype=np.uint8).copy()
        every = np.empty((self.size, mine.size), dtype=np.uint8)
        self._wait([self.comm.Iallgather(mine, every)], what)
        return [row.tobytes() for row in every]

    def _bcast_object(self, obj, what: str):
        """Rank 0's `obj` (pickled) on every rank: its length, then its bytes."""
        data = pickle.dumps(obj) if self.is_root else b""
        length = np.array([len(data)], dtype=np.int64)
        self._wait([self.comm.Ibcast(length, root=self.root)], what)
        payload = np.frombuffer(data, dtype=np.uint8).copy() if self.is_root else np.empty(int(length[0]), np.uint8)
        self._wait([self.comm.Ibcast(payload, root=self.root)], what)
        return pickle.loads(payload.tobytes())

    def _buckets(self, block: np.ndarray):
        step = max(1, self.bucket_bytes // max(block.itemsize, 1))
        return [block[i:i + step] for i in range(0, block.size, step)]

    def _install_abort_hook(self) -> None:
        comm = self.comm

        def abort(kind, value, tb):
            # One write, then a moment before MPI_Abort: the launcher forwards each rank's
            # stderr through a pipe and stops when the first rank aborts, and a run whose ranks
            # all failed at once showed one rank's first line and no traceback at all.
            sys.stderr.write(f"convdsl.distributed: uncaught exception on rank {comm.Get_rank()}; "
                             f"aborting every rank (MPI_Abort)\n"
                             + "".join(traceback.format_exception(kind, value, tb)))
            sys.stderr.flush()
            time.sleep(ABORT_GRACE_SECONDS)
            comm.Abort(1)

        if not getattr(sys.excepthook, "_convdsl_abort", False):
            abort._convdsl_abort = True
            sys.excepthook = abort

    # ---- the training API ----------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        return self.rank == self.root

    def shard(self, batch: int) -> slice:
        """The rows of a whole batch of `batch` samples that this rank trains on."""
        return slice(*shard_bounds(batch, self.size, self.rank))

    def broadcast_state(self, what: str = "broadcasting rank 0's parameters") -> None:
        """Make every rank's parameters, buffers and optimizer state rank 0's (done when created,
        and by resume). They travel as the .npz that `Model.save` writes, which the other ranks
        `load`: the optimizer's state, which the model allocates on its first step, with them."""
        def saved() -> bytes:
            with tempfile.TemporaryDirectory(prefix="convdsl-state-") as folder:
                file = Path(folder) / "state.npz"
                self.net.save(file)
                return file.read_bytes()

        data = self._on_root(what, saved)
        if not self.is_root:
            with tempfile.TemporaryDirectory(prefix="convdsl-state-") as folder:
                file = Path(folder) / "state.npz"
                file.write_bytes(data)
                self.net.load(file)

    def compute_grads(self, *args, local: bool = False) -> float:
        """`net.compute_grads` over the ranks: gradients of the mean loss over the whole batch
        land in every rank's `net.grads`, and the mean loss is returned. `args` are the inputs
        and the target. By default every rank is given the same whole batch and takes its
        shard (`shard`); with `local=True` each rank's arrays are its own samples, any number
        of them (one more Allreduce of two numbers finds the total). Every rank must be in
        the same mode (`net.train()` / `net.eval()`), as in any collective call."""
        net, n_in = self.net, len(self.net._meta["inputs"])
        if len(args) != n_in + 1:
            raise TypeError(f"compute_grads takes {n_in} input(s) and the target, got {len(args)} argument(s)")
        step = self.steps + 1
        if local:
            mine = args
        else:
            batch = len(args[0])
            if any(len(a) != batch for a in args):
                raise ValueError("the inputs and the target must hold the same number of samples")
            mine = tuple(a[self.shard(batch)] for a in args)
        samples = len(mine[0])
        started = time.perf_counter()
        if samples:
            loss = net.compute_grads(*mine)
        else:                           # fewer samples than ranks: this one adds nothing
            self.grads[...] = 0
            loss = 0.0
        computed = time.perf_counter()
        if local:
            # Weights need the total: the counts go first, in a message of their own.
            self._scalars[:] = (samples, samples * loss)
            self._wait([self.comm.Iallreduce(self._MPI.IN_PLACE, self._scalars)],
                       f"summing the batch sizes of step {step}")
            total = self._scalars[0]
            if total == 0:
                raise ValueError("the batch is empty on every rank")
        else:
            total = len(args[0])
        weight = samples / total
        # Only a training-mode forward moves the running statistics; an eval-mode one leaves
        # them equal on every rank, where averaging would only add rounding.
        blocks = (self.grads, self.buffers) if net.training else (self.grads,)
        if weight != 1:                 # one rank with the whole batch: nothing to weight
            for block in blocks:
                block *= weight
        if not local:
            self._scalars[:] = (samples, weight * loss)
        if self.size > 1:
            requests = [self.comm.Iallreduce(self._MPI.IN_PLACE, b) for blk in blocks for b in self._buckets(blk)]
            if not local:
                requests.append(self.comm.Iallreduce(self._MPI.IN_PLACE, self._scalars))
            self._wait(requests, f"the gradient Allreduce of step {step}")
        self.timing["local"] += computed - started
        self.timing["allreduce"] += time.perf_counter() - computed
        self.steps = step
        return float(self._scalars[1] / total if local else self._scalars[1])

    def update(self, lr, **optimizer) -> None:
        """`net.update(lr, **optimizer)` on every rank: the same step from the same gradients."""
        started = time.perf_counter()
        self.net.update(lr, **optimizer)
        self.timing["update"] += time.perf_counter() - started

    def train_step(self, *args, lr=None, local: bool = False, **optimizer) -> float:
        """compute_grads then update: `train_step(x, target, lr, optimizer="adam", ...)` with
        `net.train_step`'s keywords; returns the whole batch's mean loss."""
        n_in = len(self.net._meta["inputs"])
        if lr is None and len(args) == n_in + 2:
            *args, lr = args
        if lr is None:
            raise TypeError("train_step needs lr")
        loss = self.compute_grads(*args, local=local)
        self.update(lr, **optimizer)
        return loss

    @property
    def message_bytes(self) -> int:
        """Bytes each step Allreduces: the gradient block, the buffers and the loss."""
        return self.grads.nbytes + self.buffers.nbytes + self._scalars.nbytes

    # ---- checks and checkpoints ------------------------------------------------------------
    def in_sync(self) -> bool:
        """Whether every rank's parameters, buffers and optimizer state are bit for bit the same
        (collective)."""
        digest = hashlib.sha256(self.params.tobytes() + self.buffers.tobytes())
        for name, value in sorted(self.net.optimizer_state.items()):
            digest.update(name.encode() + np.ascontiguousarray(value).tobytes())
        digest = digest.digest()
        digests = self._allgather_digest(digest, "comparing the parameters of every rank")
        return len(set(digests)) == 1

    def _on_root(self, what: str, action):
        """Run `action` on rank 0 and give every rank its result, or raise its error on every
        rank (so that a failure on rank 0 does not leave the others waiting)."""
        outcome = None
        if self.is_root:
            try:
                outcome = ("ok", action())
            except Exception as e:          # reported on every rank below
                outcome = ("error", f"{type(e).__name__}: {e}")
        status, value = self._bcast_object(outcome, what)
        if status == "error":
            raise DistributedError(f"{what} failed on rank {self.root}: {value}")
        return value

    def save(self, path) -> None:
        """Rank 0 writes the model (`Model.save`'s .npz) to `path`, atomically (collective)."""
        path = _npz(path)
        self._on_root(f"saving {path}", lambda: _atomic(path, self.net.save))

    def checkpoint(self, path, step: int) -> None:
        """Rank 0 writes the model to `path` (an .npz that `Model.load` reads) and, beside it,
        `path` + ".json" with the step the checkpoint was taken after (collective). Each file
        is written to a temporary name and renamed, so a crash leaves the previous checkpoint."""
        path = _npz(path)

        def write():
            _atomic(path, self.net.save)
            info = {"step": int(step), "ranks": self.size, "network": self.net._meta["network"]}
            _atomic(_info_path(path), lambda p: Path(p).write_text(json.dumps(info) + "\n"))

        self._on_root(f"writing the checkpoint {path}", write)

    def resume(self, path, missing_ok: bool = False) -> int:
        """Load the checkpoint at `path` on rank 0, broadcast it to every rank, and return the
        step it was taken after (collective). With `missing_ok`, a checkpoint that rank 0 does
        not have is a fresh start: nothing changes and the step is 0."""
        path = _npz(path)

        def read():
            if missing_ok and not path.exists():
                return None
            self.net.load(path)
            return int(json.loads(_info_path(path).read_text())["step"])

        step = self._on_root(f"reading the checkpoint {path}", read)
        if step is None:
            return 0
        self.broadcast_state(f"broadcasting the checkpoint {path}")
        return step

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort)."""
        self.comm.Abort(code)


def _npz(path) -> Path:
    """`path` with the .npz suffix that np.savez (so Model.save) adds when it is missing."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _info_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _atomic(path: Path, write) -> None:
    """`write(temporary path)`, then rename it to `path`: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
