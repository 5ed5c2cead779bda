"""Model: the Python face of a generated network — numpy in, numpy out, every array checked.

A generated module carries a small `meta` dict (names and shapes, no code) and its compiled
extension; `make_model_class` joins them. Nothing the caller passes reaches C unchecked:
shapes are compared with the file's declaration, dtypes converted or refused, arrays made
contiguous, labels range-checked.

A Model may be shared between threads: calls on one Model run one at a time, under the
model's lock (cffi releases the GIL inside C, so the lock is what keeps one call's prepare
from freeing the memory another call is computing in).
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import sys
import threading
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import numpy as np

DTYPES = {"f32": np.float32, "f64": np.float64}


class _Memory:
    """Lets numpy view C memory while keeping the C model alive for as long as the view is."""

    def __init__(self, address: int, shape: tuple, dtype, owner):
        self.__array_interface__ = {"shape": tuple(shape), "typestr": np.dtype(dtype).str,
                                    "data": (address, False), "version": 3}
        self.owner = owner


def _memory_budget() -> float:
    """Half the machine's physical memory: the most activations a prepare may allocate."""
    try:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0.0          # unknown: the module's own default cap applies


def _shape_text(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _narrowed(arr: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, Any]:
    """`arr` as a C-contiguous, aligned array of `dtype`, and the first finite value that does
    not fit in `dtype` (it came out infinite), or None."""
    if arr.dtype.kind != "f" or arr.dtype.itemsize <= dtype.itemsize:
        return np.require(arr, dtype, ["C", "A"]), None
    with np.errstate(over="ignore"):
        out = np.require(arr, dtype, ["C", "A"])
    finite_out = np.isfinite(out)
    if finite_out.all():
        return out, None
    lost = ~finite_out & np.isfinite(arr)
    return out, (arr[lost].flat[0] if lost.any() else None)


def _one_at_a_time(method):
    """Run a method of the model under its lock: calls on one Model never overlap."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return locked


class ModelBase:
    """Subclassed once per generated network with `_ffi`, `_lib` and `_meta` set.

    A Model may be shared between threads; calls on one Model run one at a time (under
    `model.lock`, an RLock); for parallel inference use one Model per thread. What a call
    returns is a fresh array that no later call changes. `params`, `grads` and `buffers` are
    live views of the model's memory: hold `with model.lock:` around a sequence that must not
    be interleaved with other threads' calls (forward, backward, reading `grads`). A backward
    or loss after another thread's forward on the same model is refused.
    """

    _ffi: Any = None
    _lib: Any = None
    _meta: dict = {}

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2 ** 64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        meta = self._meta
        self._p = meta["prefix"]
        self._dtype = np.dtype(DTYPES[meta["dtype"]])
        raw = self._call("create", int(seed))
        if raw == self._ffi.NULL:
            raise MemoryError(f"could not allocate the parameters of {meta['network']}")
        self._m = self._ffi.gc(raw, getattr(self._lib, f"{self._p}_destroy"))
        # A batch too large for this machine is refused by prepare instead of being killed
        # later by the kernel's out-of-memory handler.
        self._call("set_memory_limit", self._m, _memory_budget())
        params, grads = OrderedDict(), OrderedDict()
        for i, (name, shape, trainable) in enumerate(meta["params"]):
            params[name] = self._view(self._call("param_data", self._m, i), shape)
            if trainable:
                grads[name] = self._view(self._call("grad_data", self._m, i), shape)
        self.params = MappingProxyType(params)
        self.grads = MappingProxyType(grads)
        # Layer state that is not trained (batchnorm's running statistics): changed by a
        # training-mode forward, saved and loaded with the parameters.
        buffers = OrderedDict()
        for i, (name, shape) in enumerate(meta.get("buffers", ())):
            buffers[name] = self._view(self._call("buffer_data", self._m, i), shape)
        self.buffers = MappingProxyType(buffers)
        self._prepared: tuple | None = None
        self._last_outputs: tuple | None = None
        self._forward_key: tuple | None = None
        self._eval_inputs: list | None = None
        self.training = True
        self.lock = threading.RLock()
        # Forwards (and train_steps) started on this model, and per thread the number of the
        # last one that thread started: a backward pairs only with the model's latest forward.
        self._forwards = 0
        self._thread = threading.local()

    # ---- plumbing ----------------------------------------------------------------------
    def _call(self, fn: str, *args):
        return getattr(self._lib, f"{self._p}_{fn}")(*args)

    def _view(self, ptr, shape) -> np.ndarray:
        address = int(self._ffi.cast("uintptr_t", ptr))
        return np.asarray(_Memory(address, tuple(shape), self._dtype, self._m))

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(self._ffi.string(self._call("last_error", self._m)).decode())

    def _ptrs(self, arrays, writable: bool):
        ctype = f"{self._p}_real *[]"
        cast = f"{self._p}_real *"
        return self._ffi.new(ctype, [self._ffi.cast(cast, self._ffi.from_buffer(a, require_writable=writable))
                                     for a in arrays])

    def _read(self, x, what: str) -> np.ndarray:
        """An array of real numbers, not yet converted: shapes are checked before any copy."""
        masked = sys.modules.get("numpy.ma")
        if masked is not None and isinstance(x, masked.MaskedArray):
            raise TypeError(f"{what}: a masked array would be read without its mask; fill the masked "
                            f"values first (a.filled(0))")
        if type(x) is np.ndarray:
            arr = x
        else:
            try:
                arr = np.asarray(x)
            except Exception as e:  # ragged lists and the like
                raise TypeError(f"{what}: cannot be read as an array ({e})") from None
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{what}: expected real numbers ({self._dtype.name}), got dtype {arr.dtype}")
        return arr

    def _converted(self, arr: np.ndarray, what: str) -> np.ndarray:
        """A C-contiguous, aligned array of the model's dtype; values that would overflow it are refused."""
        out, lost = _narrowed(arr, self._dtype)
        if lost is not None:
            raise ValueError(f"{what}: {lost:g} does not fit in {self._dtype.name} "
                             f"(largest {np.finfo(self._dtype).max:g})")
        return out

    def _as_array(self, x, what: str) -> np.ndarray:
        """Convert to a C-contiguous array of the model's dtype, or refuse clearly."""
        return self._converted(self._read(x, what), what)

    # ---- shapes ------------------------------------------------------------------------
    def _bind_inputs(self, xs) -> tuple[list[np.ndarray], int, tuple[int, ...]]:
        """The inputs checked against the declaration, not yet converted (see _inputs_for_c)."""
        meta = self._meta
        inputs = meta["inputs"]
        if len(xs) != len(inputs):
            names = ", ".join(i["name"] for i in inputs)
            raise TypeError(f"{meta['network']} takes {len(inputs)} input(s) ({names}), got {len(xs)}")
        sizes: dict[str, int] = {}
        batch = None
        arrays = []
        for x, spec in zip(xs, inputs):
            name = spec["name"]
            arr = self._read(x, f"input `{name}`")
            want = ["N", *spec["dims"]]
            if arr.ndim != len(want):
                raise ValueError(f"input `{name}`: expected an array shaped {_shape_text(want)} "
                                 f"(batch first, layout {meta['layout']}), got shape {arr.shape}")
            if batch is None:
                batch = arr.shape[0]
            if arr.shape[0] != batch:
                raise ValueError(f"input `{name}`: batch size {arr.shape[0]} differs from the first input's {batch}")
            for axis, (d, got) in enumerate(zip(spec["dims"], arr.shape[1:]), start=1):
                if isinstance(d, int):
                    if got != d:
                        raise ValueError(f"input `{name}`: expected shape {_shape_text(want)}, got {arr.shape} "
                                         f"(axis {axis} must be {d})")
                else:
                    if d in sizes and sizes[d] != got:
                        raise ValueError(f"input `{name}`: size {d} is {got} here but {sizes[d]} elsewhere")
                    sizes[d] = got
            arrays.append(arr)
        if batch is None or batch < 1:
            raise ValueError("the batch is empty: inputs need at least one sample")
        for d, v in sizes.items():
            if v < 1:
                raise ValueError(f"size {d} must be at least 1, got {v}")
        return arrays, int(batch), tuple(int(sizes[s]) for s in meta["sym_dims"])

    def _inputs_for_c(self, arrays) -> list[np.ndarray]:
        """Converted after prepare, so that a batch too large for memory is refused by prepare
        before numpy tries to copy it."""
        return [self._converted(arr, f"input `{spec['name']}`") for arr, spec in zip(arrays, self._meta["inputs"])]

    def _start_forward(self) -> None:
        self._forwards += 1
        self._thread.forward = self._forwards

    def _check_pairing(self, what: str) -> None:
        mine = getattr(self._thread, "forward", None)
        if mine is not None and mine != self._forwards:
            raise RuntimeError(f"{what}: another thread ran forward or train_step on this model after this "
                               f"thread's forward, so its activations are not this thread's batch; hold "
                               f"`with model.lock:` around forward and {what}, or give each thread its own Model")

    def _prepare(self, batch: int, sizes: tuple[int, ...]) -> None:
        key = (batch, sizes)
        if self._prepared == key:
            return
        self._prepared = None
        self._forward_key = None
        c_sizes = self._ffi.new("int64_t[]", list(sizes) or [0])
        rc = self._call("prepare", self._m, batch, c_sizes)
        if rc != 0:
            raise ValueError(self._ffi.string(self._call("last_error", self._m)).decode())
        self._prepared = key

    def _shape(self, kind: str, index: int) -> tuple[int, ...]:
        buf = self._ffi.new("int64_t[8]")
        rank = self._call(f"{kind}_shape", self._m, index, buf)
        return tuple(int(buf[i]) for i in range(rank))

    # ---- the API of §7 -----------------------------------------------------------------
    @_one_at_a_time
    def forward(self, *xs):
        """Run the network on a batch; returns one array, or a tuple for several outputs."""
        arrays, batch, sizes = self._bind_inputs(xs)
        self._start_forward()
        self._prepare(batch, sizes)
        arrays = self._inputs_for_c(arrays)
        outs = [np.empty(self._shape("output", i), dtype=self._dtype) for i in range(len(self._meta["outputs"]))]
        self._check(self._call("forward", self._m, self._ptrs(arrays, False), self._ptrs(outs, True)))
        # An eval-mode forward runs in shared memory and keeps nothing for a backward; its inputs
        # are kept (copied: the caller may reuse its arrays) so that a backward can recompute it.
        self._eval_inputs = None if self.training else [np.array(a, copy=True) for a in arrays]
        self._forward_key = self._prepared
        self._last_outputs = tuple(o.shape for o in outs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @_one_at_a_time
    def backward(self, *dys):
        """Gradients of the inputs for the given output gradients; parameter gradients land in `grads`."""
        self._check_pairing("backward")
        if self._forward_key is None or self._forward_key != self._prepared:
            raise RuntimeError("backward needs a forward first (on the same batch)")
        outputs = self._meta["outputs"]
        if len(dys) != len(outputs):
            raise TypeError(f"backward takes one gradient per output ({len(outputs)}), got {len(dys)}")
        grads = []
        for dy, spec, shape in zip(dys, outputs, self._last_outputs):
            what = f"gradient of output `{spec['name']}`"
            arr = self._read(dy, what)
            if arr.shape != shape:
                raise ValueError(f"{what}: expected shape {shape}, got {arr.shape}")
            grads.append(self._converted(arr, what))
        dxs = [np.empty(self._shape("input", i), dtype=self._dtype) for i in range(len(self._meta["inputs"]))]
        if self._eval_inputs is not None:
            self._recompute_for_backward()
        self._check(self._call("backward", self._m, self._ptrs(grads, False), self._ptrs(dxs, True)))
        return dxs[0] if len(dxs) == 1 else tuple(dxs)

    def _recompute_for_backward(self) -> None:
        """The eval-mode forward again, now keeping its activations: eval mode is deterministic
        (dropout is the identity, batchnorm reads its running statistics), so it is the same."""
        arrays, self._eval_inputs = self._eval_inputs, None
        mode = 1 if self.training else 0
        self._call("set_training", self._m, 0)
        self._call("set_keep_for_backward", self._m, 1)
        try:
            self._check(self._call("forward", self._m, self._ptrs(arrays, False), self._ffi.NULL))
        finally:
            self._call("set_keep_for_backward", self._m, 0)
            self._call("set_training", self._m, mode)

    def _target(self, target) -> np.ndarray:
        loss = self._meta["loss"]
        out_shape = self._shape("output", loss["output_index"])
        batch = out_shape[0]
        if loss["target_kind"] == "labels":
            # One class per sample, or per position of a map; classes are the channels.
            nhwc = self._meta["layout"] == "NHWC" and len(out_shape) > 2
            spatial = out_shape[1:-1] if nhwc else out_shape[2:]
            classes = out_shape[-1] if nhwc else out_shape[1]
            target_dims = () if all(d == 1 for d in spatial) else spatial
            arr = np.asarray(target)
            if arr.dtype.kind == "f":
                if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                    raise TypeError("labels must be whole numbers (class indices)")
            elif arr.dtype.kind not in "iub":
                raise TypeError(f"labels must be integers (class indices), got dtype {arr.dtype}")
            want = (batch, *target_dims)
            if arr.shape != want:
                raise ValueError(f"labels: expected shape {want}, got {arr.shape}")
            # The range is checked on the labels as given, before int64: 1e20 or 2**64 - 1 would
            # wrap to a negative class in the conversion and be reported as that.
            outside = (arr < 0) | (arr >= classes)
            if outside.any():
                bad = arr[outside].flat[0]
                shown = int(bad) if arr.dtype.kind == "f" else bad
                raise ValueError(f"labels: class {shown} is out of range [0, {classes})")
            return np.ascontiguousarray(arr, dtype=np.int64)
        arr = self._as_array(target, "target")
        if arr.shape != out_shape:
            raise ValueError(f"target: expected shape {out_shape} (like the output), got {arr.shape}")
        return arr

    @_one_at_a_time
    def train_step(self, *args, lr=None) -> float:
        """forward, loss, backward and one SGD step (p -= lr · grad); returns the loss."""
        if self._meta["loss"] is None:
            raise RuntimeError(f"network {self._meta['network']} declares no loss: add `loss …` to train it")
        n_in = len(self._meta["inputs"])
        if lr is None and len(args) == n_in + 2:
            *args, lr = args
        if len(args) != n_in + 1:
            raise TypeError(f"train_step takes {n_in} input(s), the target and lr")
        lr = _learning_rate(lr)
        arrays, batch, sizes = self._bind_inputs(args[:-1])
        self._start_forward()
        self._prepare(batch, sizes)
        arrays = self._inputs_for_c(arrays)
        target = self._target(args[-1])
        loss = self._ffi.new("double *")
        rc = self._call("train_step", self._m, self._ptrs(arrays, False),
                        self._ffi.cast("void *", self._ffi.from_buffer(target)), lr, loss)
        self._check(rc)
        self._forward_key = None      # parameters changed: the stored activations are stale
        self._eval_inputs = None
        return float(loss[0])

    @_one_at_a_time
    def loss(self, target) -> float:
        """The loss of the last forward's output against `target`."""
        if self._meta["loss"] is None:
            raise RuntimeError(f"network {self._meta['network']} declares no loss")
        self._check_pairing("loss")
        if self._forward_key is None or self._forward_key != self._prepared:
            raise RuntimeError("loss needs a forward first")
        t = self._target(target)
        out = self._ffi.new("double *")
        self._check(self._call("loss", self._m, self._ffi.cast("void *", self._ffi.from_buffer(t)), out))
        return float(out[0])

    @_one_at_a_time
    def train(self) -> "ModelBase":
        self.training = True
        self._call("set_training", self._m, 1)
        return self

    @_one_at_a_time
    def eval(self) -> "ModelBase":
        self.training = False
        self._call("set_training", self._m, 0)
        return self

    @_one_at_a_time
    def memory(self) -> dict[str, int]:
        """Bytes the last prepared batch uses for the current mode: `activations` (eval: forward
        only, values sharing memory by lifetime; training: what the backward reads, the gradients
        and saved masks, sharing memory by lifetime; both as `convdsl check` reports them per
        sample) and the `workspace` (shared, and per thread for a backward that splits the batch)."""
        return {"activations": int(self._call("arena_bytes", self._m)),
                "workspace": int(self._call("workspace_bytes", self._m))}

    def _state(self) -> dict[str, np.ndarray]:
        """Parameters then buffers, by name: what save writes and load restores."""
        return {**self.params, **self.buffers}

    @_one_at_a_time
    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: arr.copy() for name, arr in self._state().items()}

    @_one_at_a_time
    def save(self, path) -> None:
        """Write every parameter and buffer to an .npz file, by name."""
        path = os.fspath(path)
        np.savez(path, **self.state_dict())

    @_one_at_a_time
    def load(self, path) -> None:
        """Read parameters and buffers saved by `save`; names and shapes must match exactly,
        and every value must fit in the model's dtype. Nothing changes unless all of it does."""
        state = self._state()
        try:
            data = np.load(os.fspath(path), allow_pickle=False)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Exception as e:  # not numpy's format at all: junk, a text file, a broken zip
            raise ValueError(f"{path}: not an .npz file written by save ({e})") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} holds a single array (.npy); load takes the .npz file written by save")
        with data:
            names = set(data.files)
            expected = set(state)
            if names != expected:
                missing = sorted(expected - names)
                extra = sorted(names - expected)
                raise ValueError(f"{path}: parameters and buffers do not match this network"
                                 + (f"; missing {missing}" if missing else "")
                                 + (f"; unexpected {extra}" if extra else ""))
            staged = {}
            for name, arr in state.items():
                try:
                    value = data[name]
                except Exception as e:  # object arrays (pickles), a damaged member
                    raise ValueError(f"{path}: `{name}` cannot be read ({e})") from None
                if value.shape != arr.shape:
                    raise ValueError(f"{path}: `{name}` has shape {value.shape}, expected {arr.shape}")
                if value.dtype.kind not in "biuf":
                    raise TypeError(f"{path}: `{name}` has dtype {value.dtype}, expected real numbers")
                staged[name], lost = _narrowed(value, self._dtype)
                if lost is not None:
                    raise ValueError(f"{path}: `{name}` holds {lost:g}, which does not fit in {self._dtype.name} "
                                     f"(largest {np.finfo(self._dtype).max:g})")
        for name, value in staged.items():
            state[name][...] = value

    def __repr__(self) -> str:
        n = sum(a.size for a in self.params.values())
        return f"<{self._meta['network']} model: {n:,} parameters, {'training' if self.training else 'eval'} mode>"


def _learning_rate(lr) -> float:
    try:
        value = float(lr) if isinstance(lr, numbers.Real) and not isinstance(lr, bool) else math.nan
    except (OverflowError, ValueError, TypeError):     # 10**400, odd Real types
        value = math.nan
    if not math.isfinite(value):
        shown = repr(lr)
        raise ValueError(f"lr must be a finite number, got {shown if len(shown) <= 40 else shown[:37] + '...'}")
    return value


def make_model_class(ext_module, meta: dict) -> type:
    """The Model class of one generated network."""
    return type("Model", (ModelBase,), {"_ffi": ext_module.ffi, "_lib": ext_module.lib, "_meta": meta,
                                        "__doc__": f"Network {meta['network']} compiled by convdsl."})
