"""Model: the Python face of a generated network — numpy in, numpy out, every array checked.

A generated module carries a small `meta` dict (names and shapes, no code) and its compiled
library; `make_model_class` joins them. Nothing the caller passes reaches C unchecked:
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


class _Geometry:
    """What one prepared geometry (batch size and run-time sizes) fixes for every call at it,
    worked out once by the first call there so that the calls after it only compare and fill in.

    `input_shapes` are the shapes of the inputs that call accepted: an input of exactly that
    shape, the model's dtype, C-contiguous and aligned passes every check the full path makes
    (see ModelBase._accepts). The pointer arrays are the C API's `real *const *` arguments,
    filled per call under the model's lock. `eval_inputs` are the model's own copies of an
    eval-mode forward's inputs (a backward recomputes that forward from them), allocated by the
    first eval forward at this geometry and overwritten by the next ones."""

    __slots__ = ("key", "input_shapes", "c_input_shapes", "output_shapes", "input_ptrs", "output_ptrs",
                 "grad_ptrs", "input_grad_ptrs", "eval_inputs", "eval_input_ptrs", "loss_output_shape",
                 "label_shape", "classes")

    def __init__(self, model: "ModelBase", key: tuple, input_shapes: tuple):
        ffi, n_in, n_out = model._ffi, len(model._meta["inputs"]), len(model._meta["outputs"])
        self.key = key
        self.input_shapes = input_shapes
        self.c_input_shapes = tuple(model._shape("input", i) for i in range(n_in))
        self.output_shapes = tuple(model._shape("output", i) for i in range(n_out))
        array_of = f"{model._p}_real *[{max(n_in, n_out, 1)}]"
        self.input_ptrs, self.output_ptrs = ffi.new(array_of), ffi.new(array_of)
        self.grad_ptrs, self.input_grad_ptrs = ffi.new(array_of), ffi.new(array_of)
        self.eval_inputs: tuple | None = None
        self.eval_input_ptrs = None
        loss = model._meta["loss"]
        self.loss_output_shape = None if loss is None else self.output_shapes[loss["output_index"]]
        self.label_shape = self.classes = None
        if loss is not None and loss["target_kind"] == "labels":
            # One class per sample, or per position of a map; classes are the channels.
            out_shape = self.loss_output_shape
            nhwc = model._meta["layout"] == "NHWC" and len(out_shape) > 2
            spatial = out_shape[1:-1] if nhwc else out_shape[2:]
            self.classes = out_shape[-1] if nhwc else out_shape[1]
            self.label_shape = (out_shape[0], *(() if all(d == 1 for d in spatial) else spatial))

    def eval_copies(self, model: "ModelBase"):
        """The buffers an eval forward copies its inputs into (allocated by the first one, with
        `eval_input_ptrs` pointing at them for good)."""
        if self.eval_inputs is None:
            self.eval_inputs = tuple(np.empty(s, dtype=model._dtype) for s in self.c_input_shapes)
            ptrs = model._ffi.new(f"{model._p}_real *[{max(len(self.eval_inputs), 1)}]")
            for i, buf in enumerate(self.eval_inputs):
                ptrs[i] = model._ffi.from_buffer(model._real_array, buf, require_writable=True)
            self.eval_input_ptrs = ptrs
        return self.eval_inputs


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


def _usable_cores() -> int:
    """The threads OpenMP's parallel regions take by default here: OMP_NUM_THREADS's (first)
    number where it is set, else the CPUs this process may run on."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# The C calls of every Model of the process that are running now, one entry each (a list's
# append and pop are atomic under the GIL: cheaper on the per-call path than a lock). A call that
# starts while others run takes its share of the cores, so that several Python threads each
# running a model do not start more OpenMP threads than there are cores.
_CALLS_RUNNING: list = []


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

    def __init__(self, seed: int = 0, device: str | int | None = None, threads: int | None = None):
        """`device` (OpenCL backend only): "P:D", a device index, or part of the device's name;
        None takes CONVDSL_OPENCL_DEVICE, else the first device found.

        `threads`: the OpenMP threads each forward, backward and update runs on (C backend; the
        `threads` attribute, settable). None, the default: OMP_NUM_THREADS, else every core the
        process may use, shared among the calls running at the same moment in this process (a
        call takes cores // calls running as it starts, at least one)."""
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2 ** 64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self._threads = self._checked_threads(threads)
        meta = self._meta
        self._p = meta["prefix"]
        self._dtype = np.dtype(DTYPES[meta["dtype"]])
        self.backend = meta.get("backend", "c")
        if self.backend == "opencl":
            spec = self._ffi.NULL if device is None else str(device).encode()
            raw = self._call("create_on", int(seed), spec)
            if raw == self._ffi.NULL:
                raise RuntimeError(self._ffi.string(self._call("last_error", self._ffi.NULL)).decode())
        else:
            if device is not None:
                raise ValueError(f"device={device!r} is for the OpenCL backend; {meta['network']} was built "
                                 f"for the C backend (convdsl.load(..., backend=\"opencl\"))")
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
        self._forward_key: tuple | None = None
        # The geometry of the latest forward or train_step, and the one whose eval_inputs hold
        # the last eval-mode forward's inputs (None when no backward has to recompute one).
        self._geometry: _Geometry | None = None
        self._eval_inputs: _Geometry | None = None
        # What every call uses, looked up once: the C functions and the cffi type of an array.
        lib, p = self._lib, self._p
        self._c_forward = getattr(lib, f"{p}_forward")
        self._c_backward = getattr(lib, f"{p}_backward")
        self._c_train_step = getattr(lib, f"{p}_train_step")
        self._c_compute_grads = getattr(lib, f"{p}_compute_grads")
        self._c_update = getattr(lib, f"{p}_update")
        self._c_set_threads = getattr(lib, f"{p}_set_threads")
        self._cores = _usable_cores()
        # Told before the first prepare, which plans the per-thread workspaces for it: a model
        # prepares as any other one does, whatever OpenMP's count in the calling thread is (torch,
        # sharing libgomp, may have set it to 1), and so sums what threads split in the same order.
        self._threads_set = 0          # what set_threads last told the C model
        self._tell_threads(self._threads or self._cores)
        # The optimizer's arguments as C reads them, and the keywords they were checked for (a
        # loop that passes the same keywords every step checks them once).
        self._optimizer = self._ffi.new(f"{p}_optimizer *")
        self._optimizer_key: tuple | None = None
        # What loss_grad recomputes from: the target of the last loss, compute_grads or
        # train_step, with the geometry and forward it belongs to.
        self._loss_target: tuple | None = None
        self._c_loss = getattr(lib, f"{p}_loss")
        self._real_array = self._ffi.typeof(f"{p}_real[]")
        self._loss_out = self._ffi.new("double *")
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

    def _c_error(self) -> RuntimeError:
        return RuntimeError(self._ffi.string(self._call("last_error", self._m)).decode())

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

    def _accepts(self, xs, shapes: tuple) -> bool:
        """Whether `xs` pass the full path's checks as they are, known from an earlier call that
        checked arrays of these shapes: each a plain ndarray of exactly its shape, the model's
        dtype, C-contiguous and aligned (so there is nothing to check or convert)."""
        if len(xs) != len(shapes):
            return False
        dtype = self._dtype
        for x, shape in zip(xs, shapes):
            if type(x) is not np.ndarray or x.shape != shape or x.dtype != dtype:
                return False
            flags = x.flags
            if not (flags.c_contiguous and flags.aligned):
                return False
        return True

    def _bind(self, xs) -> tuple[list[np.ndarray], _Geometry]:
        """A forward or train_step's inputs and the geometry of their batch: as given when they
        are what the prepared batch accepts as is, else through the full path."""
        geo = self._geometry
        if geo is not None and geo.key == self._prepared and self._accepts(xs, geo.input_shapes):
            self._start_forward()
            return xs, geo
        return self._bind_and_prepare(xs)

    def _bind_and_prepare(self, xs) -> tuple[list[np.ndarray], _Geometry]:
        """The full path of a forward or train_step's inputs: checked, a forward started, the
        batch prepared, then converted; and the geometry of the prepared batch."""
        arrays, batch, sizes = self._bind_inputs(xs)
        self._start_forward()
        self._prepare(batch, sizes)
        arrays = self._inputs_for_c(arrays)
        shapes = tuple(a.shape for a in arrays)
        geo = self._geometry
        if geo is None or geo.key != self._prepared or geo.input_shapes != shapes:
            geo = self._geometry = _Geometry(self, self._prepared, shapes)
        return arrays, geo

    @staticmethod
    def _checked_threads(threads):
        if threads is None:
            return None
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 1 <= int(threads) <= 4096:
            raise ValueError(f"threads must be None or an integer from 1 to 4096, got {threads!r}")
        return int(threads)

    @property
    def threads(self) -> int | None:
        """The OpenMP threads of each call; None: a share of the cores (see Model())."""
        return self._threads

    @threads.setter
    def threads(self, threads) -> None:
        threads = self._checked_threads(threads)
        with self.lock:
            self._threads = threads
            if threads:
                self._tell_threads(threads)

    def _tell_threads(self, threads: int) -> None:
        self._c_set_threads(self._m, threads)
        self._threads_set = threads

    def _run(self, c_function, *args) -> int:
        """A C call that computes, on this model's threads: `threads`, else its share of the cores
        among the calls running now in this process."""
        _CALLS_RUNNING.append(None)
        try:
            threads = self._threads or max(1, self._cores // len(_CALLS_RUNNING))
            if threads != self._threads_set:
                self._tell_threads(threads)
            return c_function(*args)
        finally:
            _CALLS_RUNNING.pop()

    def _pointers(self, ptrs, arrays):
        """`ptrs` (a cached `real *[]`) pointing at `arrays`, which the caller keeps alive."""
        real, from_buffer = self._real_array, self._ffi.from_buffer
        for i, a in enumerate(arrays):
            ptrs[i] = from_buffer(real, a)
        return ptrs

    def _new_arrays(self, shapes: tuple, ptrs) -> list[np.ndarray]:
        """Fresh arrays for the C function to write (a call returns arrays no later call
        changes), with `ptrs` pointing at them."""
        real, from_buffer, dtype = self._real_array, self._ffi.from_buffer, self._dtype
        arrays = []
        for i, shape in enumerate(shapes):
            a = np.empty(shape, dtype)
            ptrs[i] = from_buffer(real, a, True)
            arrays.append(a)
        return arrays

    # ---- the API of §7 -----------------------------------------------------------------
    # Each call first tries the path of the geometry the previous call worked out (_accepts),
    # and takes the full path of checks and conversions only when that does not fit: the
    # first call at a batch, a list, another dtype, a strided view, a wrong shape (whose
    # error message the full path writes). forward, backward and train_step take the lock
    # themselves, as _one_at_a_time would, to spare the per-call path a wrapper's call.
    def forward(self, *xs):
        """Run the network on a batch; returns one array, or a tuple for several outputs."""
        with self.lock:
            arrays, geo = self._bind(xs)
            outs = self._new_arrays(geo.output_shapes, geo.output_ptrs)
            if self.training:
                inputs = self._pointers(geo.input_ptrs, arrays)
            else:
                # An eval-mode forward runs in shared memory and keeps nothing for a backward; its
                # inputs are copied (the caller may reuse its arrays) into buffers this geometry
                # keeps, so that a backward can recompute it; the forward reads those copies.
                for copy, a in zip(geo.eval_copies(self), arrays):
                    copy[...] = a
                inputs = geo.eval_input_ptrs
            # Until the C forward succeeds, no backward pairs with anything.
            self._forward_key = self._eval_inputs = None
            if self._run(self._c_forward, self._m, inputs, geo.output_ptrs):
                raise self._c_error()
            self._eval_inputs = None if self.training else geo
            self._forward_key = geo.key
            return outs[0] if len(outs) == 1 else tuple(outs)

    def _output_grads(self, dys, shapes: tuple) -> list[np.ndarray]:
        """The full path of backward's arguments: counted, shapes checked, converted."""
        outputs = self._meta["outputs"]
        if len(dys) != len(outputs):
            raise TypeError(f"backward takes one gradient per output ({len(outputs)}), got {len(dys)}")
        grads = []
        for dy, spec, shape in zip(dys, outputs, shapes):
            what = f"gradient of output `{spec['name']}`"
            arr = self._read(dy, what)
            if arr.shape != shape:
                raise ValueError(f"{what}: expected shape {shape}, got {arr.shape}")
            grads.append(self._converted(arr, what))
        return grads

    def backward(self, *dys):
        """Gradients of the inputs for the given output gradients; parameter gradients land in `grads`."""
        with self.lock:
            self._check_pairing("backward")
            geo = self._geometry
            if self._forward_key is None or self._forward_key != self._prepared or geo.key != self._forward_key:
                raise RuntimeError("backward needs a forward first (on the same batch)")
            if not self._accepts(dys, geo.output_shapes):
                dys = self._output_grads(dys, geo.output_shapes)
            dxs = self._new_arrays(geo.c_input_shapes, geo.input_grad_ptrs)
            grads = self._pointers(geo.grad_ptrs, dys)
            if self._eval_inputs is not None:
                self._recompute_for_backward()
            if self._run(self._c_backward, self._m, grads, geo.input_grad_ptrs):
                raise self._c_error()
            return dxs[0] if len(dxs) == 1 else tuple(dxs)

    def _recompute_for_backward(self) -> None:
        """The eval-mode forward again, now keeping its activations: eval mode is deterministic
        (dropout is the identity, batchnorm reads its running statistics), so it is the same."""
        geo, self._eval_inputs = self._eval_inputs, None
        mode = 1 if self.training else 0
        self._call("set_training", self._m, 0)
        self._call("set_keep_for_backward", self._m, 1)
        try:
            self._check(self._run(self._c_forward, self._m, geo.eval_input_ptrs, self._ffi.NULL))
        finally:
            self._call("set_keep_for_backward", self._m, 0)
            self._call("set_training", self._m, mode)

    def _target(self, target, geo: _Geometry) -> np.ndarray:
        """The loss's target checked against the prepared batch `geo`, as the loss's kind of target
        says (ops/losses.py, in the module's metadata): class labels, an array shaped like the
        loss's output, or such an array of probabilities."""
        if geo.classes is None:
            arr = self._as_array(target, "target")
            if arr.shape != geo.loss_output_shape:
                raise ValueError(f"target: expected shape {geo.loss_output_shape} (like the output), "
                                 f"got {arr.shape}")
            if self._meta["loss"]["target_kind"] == "probabilities":
                # Written as "inside", so that a NaN is outside.
                inside = (arr >= 0) & (arr <= 1)
                if not inside.all():
                    raise ValueError(f"target: values must be probabilities in [0, 1], got {arr[~inside].flat[0]}")
            return arr
        arr = target if type(target) is np.ndarray else np.asarray(target)
        kind, classes = arr.dtype.kind, geo.classes
        if kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise TypeError("labels must be whole numbers (class indices)")
        elif kind not in "iub":
            raise TypeError(f"labels must be integers (class indices), got dtype {arr.dtype}")
        if arr.shape != geo.label_shape:
            raise ValueError(f"labels: expected shape {geo.label_shape}, got {arr.shape}")
        # The range is checked on the labels as given, before int64: 1e20 or 2**64 - 1 would
        # wrap to a negative class in the conversion and be reported as that. One reduction
        # where it can be (seen unsigned, a negative integer is larger than any class); the
        # mask of offenders is built only to name one.
        if kind == "i":
            outside_any = arr.view(arr.dtype.str.replace("i", "u")).max() >= classes
        elif kind == "f":
            outside_any = arr.min() < 0 or arr.max() >= classes
        else:
            outside_any = arr.max() >= classes
        ignored = self._meta["loss"].get("ignore_index")
        if outside_any:
            outside = (arr < 0) | (arr >= classes)
            if ignored is not None:
                outside &= arr != ignored
            if not outside.any():
                return np.ascontiguousarray(arr, dtype=np.int64)
            bad = arr[outside].flat[0]
            shown = int(bad) if kind == "f" else bad
            raise ValueError(f"labels: class {shown} is out of range [0, {classes})"
                             + ("" if ignored is None else f" and is not the ignore_index, {ignored}"))
        return np.ascontiguousarray(arr, dtype=np.int64)

    def _optimizer_args(self, lr, optimizer, momentum, nesterov, weight_decay, betas, eps, max_grad_norm):
        """The C optimizer struct for these arguments, checked as torch.optim checks them."""
        lr = _learning_rate(lr)
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr} (lr must be >= 0)")
        key = (optimizer, momentum, nesterov, weight_decay, betas, eps, max_grad_norm)
        opt = self._optimizer
        if key != self._optimizer_key:
            self._optimizer_key = None
            _fill_optimizer(opt, self._lib, self._p, *key)
            # Only immutable keywords are remembered (a list of betas may change in place).
            if type(betas) is tuple:
                self._optimizer_key = key
        opt.lr = lr
        return opt

    def _training_args(self, args, lr, what: str):
        """train_step / compute_grads' inputs and target (and lr, which may come last)."""
        if self._meta["loss"] is None:
            raise RuntimeError(f"network {self._meta['network']} declares no loss: add `loss …` to train it")
        n_in = len(self._meta["inputs"])
        if what == "train_step" and lr is None and len(args) == n_in + 2:
            *args, lr = args
        if len(args) != n_in + 1:
            raise TypeError(f"{what} takes {n_in} input(s) and the target" + (" and lr" if what == "train_step" else ""))
        return args[:-1], args[-1], lr

    def train_step(self, *args, lr=None, optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=None,
                   betas=(0.9, 0.999), eps=1e-8, max_grad_norm=None) -> float:
        """compute_grads then update, in one C call: forward, loss, backward and one optimizer
        step (torch.optim's SGD, Adam or AdamW, see update); returns the loss."""
        with self.lock:
            xs, target, lr = self._training_args(args, lr, "train_step")
            opt = self._optimizer_args(lr, optimizer, momentum, nesterov, weight_decay, betas, eps, max_grad_norm)
            arrays, geo = self._bind(xs)
            target = self._target(target, geo)
            # The parameters change: whatever a forward stored is stale, even if the step fails.
            self._forward_key = self._eval_inputs = self._loss_target = None
            if self._run(self._c_train_step, self._m, self._pointers(geo.input_ptrs, arrays),
                         self._ffi.from_buffer(target), opt, self._loss_out):
                raise self._c_error()
            self._loss_target = (geo.key, self._forwards, target)
            return float(self._loss_out[0])

    def compute_grads(self, *args) -> float:
        """A forward in the model's mode (training, unless eval() was called; an eval-mode one
        keeps its activations for this backward, as train_step's does), the loss against the
        target (the last argument), zeroed gradients and the backward from the loss: the
        parameters' gradients land in `grads`, nothing is updated. Returns the loss. `update`
        then takes one optimizer step from them (a data-parallel loop averages them in between)."""
        with self.lock:
            xs, target, _ = self._training_args(args, None, "compute_grads")
            arrays, geo = self._bind(xs)
            target = self._target(target, geo)
            self._forward_key = self._eval_inputs = self._loss_target = None
            if self._run(self._c_compute_grads, self._m, self._pointers(geo.input_ptrs, arrays),
                         self._ffi.from_buffer(target), self._loss_out):
                raise self._c_error()
            # Its activations are kept: a loss, loss_grad or backward may follow.
            self._forward_key = geo.key
            self._loss_target = (geo.key, self._forwards, target)
            return float(self._loss_out[0])

    def update(self, lr, *, optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=None, betas=(0.9, 0.999),
               eps=1e-8, max_grad_norm=None) -> None:
        """One optimizer step from the current `grads` (compute_grads', or a backward's), in C.

        optimizer: "sgd" (torch.optim.SGD: momentum, nesterov, weight_decay added to the
        gradient), "adam" (torch.optim.Adam: bias-corrected moments, weight_decay added to the
        gradient) or "adamw" (torch.optim.AdamW: weight decay decoupled, default 1e-2).
        weight_decay defaults to 0 for sgd and adam. max_grad_norm first scales the gradients so
        that their global norm over the trainable parameters is at most that
        (torch.nn.utils.clip_grad_norm_; `grads` keep the clipped values). The optimizer's state
        (momentum buffers, Adam's moments and step count) lives in the model: see
        `optimizer_state`. Frozen and const parameters are never updated."""
        with self.lock:
            opt = self._optimizer_args(lr, optimizer, momentum, nesterov, weight_decay, betas, eps, max_grad_norm)
            self._forward_key = self._eval_inputs = None
            if self._run(self._c_update, self._m, opt):
                raise self._c_error()

    @_one_at_a_time
    def loss_grad(self) -> np.ndarray:
        """The gradient of the loss at the loss's output (shaped like that output, in the file's
        layout), for the target of the last `loss`, `compute_grads` or `train_step`: what the
        backward starts from, so that a custom loop need not derive it."""
        if self._meta["loss"] is None:
            raise RuntimeError(f"network {self._meta['network']} declares no loss")
        self._check_pairing("loss_grad")
        held = self._loss_target
        if held is None or held[0] != self._prepared or held[1] != self._forwards:
            raise RuntimeError("loss_grad needs a loss (or compute_grads, train_step) after the last forward")
        geo = self._geometry
        grad = np.empty(geo.loss_output_shape, self._dtype)
        if self._call("loss_grad", self._m, self._ffi.from_buffer(held[2]),
                      self._ffi.from_buffer(self._real_array, grad, True)):
            raise self._c_error()
        return grad

    # ---- the optimizer's state ---------------------------------------------------------
    _STATE_TENSORS = ((0, "momentum_buffer"), (1, "exp_avg"), (2, "exp_avg_sq"))

    def _optimizer_groups(self) -> dict[str, list[tuple[str, int, int, tuple]]]:
        """Every array the optimizer's state can have, by group (a weights file holds all of a
        group or none of it): (name, C tensor, parameter index, shape). Adam's group also has
        `optim.step`, its step count (when there is a trainable parameter at all)."""
        groups = {"momentum": [], "adam": []}
        for index, (name, shape, trainable) in enumerate(self._meta["params"]):
            if not trainable:
                continue
            for tensor, suffix in self._STATE_TENSORS:
                groups["momentum" if tensor == 0 else "adam"].append((f"optim.{name}.{suffix}", tensor, index, tuple(shape)))
        return groups

    @property
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's state, as live views of the model's memory, named like torch's
        optimizer state: `optim.<param>.momentum_buffer` (SGD with momentum),
        `optim.<param>.exp_avg`, `optim.<param>.exp_avg_sq` and `optim.step` (Adam and AdamW; a
        copy). Only what a step has started is there: plain SGD has none. It is not in
        `buffers` (layer state): save writes it beside the parameters and load restores it."""
        with self.lock:
            state: dict[str, np.ndarray] = {}
            adam = False
            for group in self._optimizer_groups().values():
                for name, tensor, index, shape in group:
                    ptr = self._call("optimizer_state", self._m, tensor, index)
                    if ptr != self._ffi.NULL:
                        state[name] = self._view(ptr, shape)
                        adam = adam or tensor != 0
            if adam:
                state["optim.step"] = np.array(float(self._call("optimizer_steps", self._m)))
            return state

    @_one_at_a_time
    def reset_optimizer(self) -> None:
        """Forget the optimizer's state: the next step starts as a fresh torch optimizer's would."""
        self._call("reset_optimizer", self._m)

    @_one_at_a_time
    def loss(self, target) -> float:
        """The loss of the last forward's output against `target`."""
        if self._meta["loss"] is None:
            raise RuntimeError(f"network {self._meta['network']} declares no loss")
        self._check_pairing("loss")
        if self._forward_key is None or self._forward_key != self._prepared:
            raise RuntimeError("loss needs a forward first")
        t = self._target(target, self._geometry)
        self._loss_target = None
        if self._c_loss(self._m, self._ffi.from_buffer(t), self._loss_out):
            raise self._c_error()
        self._loss_target = (self._prepared, self._forwards, t)
        return float(self._loss_out[0])

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

    @property
    def device(self) -> str:
        """The device the model runs on: "cpu (C backend)", or the OpenCL platform / device."""
        if self.backend != "opencl":
            return "cpu (C backend)"
        return self._ffi.string(self._call("device_name", self._m)).decode()

    @property
    def program_from_cache(self) -> bool:
        """OpenCL: whether this model's kernels came from the device-binary cache (no compile)."""
        return self.backend == "opencl" and bool(self._call("program_from_cache", self._m))

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
    def state_dict(self, mapping: dict | None = None) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer by name; with `mapping` ({our name: their name},
        as load_state_dict returns it) under the other framework's names (ours where it has none)."""
        state = {name: arr.copy() for name, arr in self._state().items()}
        return state if mapping is None else {mapping.get(name, name): arr for name, arr in state.items()}

    @_one_at_a_time
    def load_state_dict(self, sd, mapping: dict | None = None, verbose: bool = True) -> dict[str, str]:
        """Load a PyTorch state_dict (tensors or arrays by name) into the parameters and buffers:
        by `mapping` ({our name: their name}), by equal names, or else by structural order with
        every shape checked (runtime/state.py); prints the correspondence found by order
        (`conv1.weight ← stem.0.weight`) unless verbose=False, and returns it. Anything that does
        not pair off exactly raises ValueError; nothing changes unless all of it loads."""
        from .state import as_arrays, correspondence, network_order
        theirs = as_arrays(sd)
        pairs, how = correspondence(network_order(self.params, self.buffers), theirs, mapping)
        staged = {}
        for name, other in pairs.items():
            staged[name], lost = _narrowed(theirs[other], self._dtype)
            if lost is not None:
                raise ValueError(f"`{other}` holds {lost:g}, which does not fit in {self._dtype.name}")
        if verbose and how == "order":
            width = max(len(n) for n in pairs)
            print("\n".join(f"{n.ljust(width)} ← {t}" for n, t in pairs.items()))
        state = self._state()
        for name, value in staged.items():
            state[name][...] = value
        return dict(pairs)

    @_one_at_a_time
    def save(self, path) -> None:
        """Write every parameter and buffer to an .npz file, by name, and the optimizer's state
        (`optimizer_state`), so that training resumes exactly where it was."""
        path = os.fspath(path)
        np.savez(path, **self.state_dict(), **{name: arr.copy() for name, arr in self.optimizer_state.items()})

    @_one_at_a_time
    def load(self, path) -> None:
        """Read parameters and buffers saved by `save`; names and shapes must match exactly,
        and every value must fit in the model's dtype. Nothing changes unless all of it does.
        The optimizer's state comes back with them when the file holds it (each of its groups,
        SGD's momentum buffers and Adam's moments with the step count, whole or not at all);
        a file without it leaves the optimizer as a fresh one."""
        state = self._state()
        groups = self._optimizer_groups()
        optional = {name: (group, tensor, index, shape) for group, entries in groups.items()
                    for name, tensor, index, shape in entries}
        if groups["adam"]:
            optional["optim.step"] = ("adam", None, None, ())
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
            present = {group for name, (group, *_rest) in optional.items() if name in names}
            expected |= {name for name, (group, *_rest) in optional.items() if group in present}
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
            optimizer = {}
            for name in sorted(expected - set(state)):
                group, tensor, index, shape = optional[name]
                try:
                    value = data[name]
                except Exception as e:
                    raise ValueError(f"{path}: `{name}` cannot be read ({e})") from None
                if value.shape != shape or value.dtype.kind not in "biuf":
                    raise ValueError(f"{path}: `{name}` has shape {value.shape} and dtype {value.dtype}, "
                                     f"expected real numbers shaped {shape}")
                if tensor is None:
                    steps = float(value)
                    if not (math.isfinite(steps) and steps >= 0 and steps == int(steps)):
                        raise ValueError(f"{path}: `{name}` holds {steps:g}, not a count of steps")
                    optimizer[name] = (None, None, int(steps))
                    continue
                converted, lost = _narrowed(value, self._dtype)
                if lost is not None:
                    raise ValueError(f"{path}: `{name}` holds {lost:g}, which does not fit in {self._dtype.name}")
                optimizer[name] = (tensor, index, converted)
        # Allocated before anything changes, so that running out of memory changes nothing.
        self._call("reset_optimizer", self._m)
        for group, first_tensor in (("momentum", 0), ("adam", 1)):
            if group in present and groups[group] and self._call("alloc_optimizer_state", self._m, first_tensor):
                raise MemoryError(self._c_error())
        for name, value in staged.items():
            state[name][...] = value
        for name, (tensor, index, value) in optimizer.items():
            if tensor is None:
                self._call("set_optimizer_steps", self._m, value)
            else:
                self._view(self._call("optimizer_state", self._m, tensor, index), value.shape)[...] = value

    def __repr__(self) -> str:
        n = sum(a.size for a in self.params.values())
        return f"<{self._meta['network']} model: {n:,} parameters, {'training' if self.training else 'eval'} mode>"


def _learning_rate(lr) -> float:
    if type(lr) is float and math.isfinite(lr):       # the usual case, without the checks below
        return lr
    try:
        value = float(lr) if isinstance(lr, numbers.Real) and not isinstance(lr, bool) else math.nan
    except (OverflowError, ValueError, TypeError):     # 10**400, odd Real types
        value = math.nan
    if not math.isfinite(value):
        shown = repr(lr)
        raise ValueError(f"lr must be a finite number, got {shown if len(shown) <= 40 else shown[:37] + '...'}")
    return value


OPTIMIZERS = ("sgd", "adam", "adamw")


def _hyperparameter(value, what: str, *, low: float = 0.0, below: float | None = None) -> float:
    """A finite real number >= low (and < below when given), refused as torch.optim does."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {what}: {value!r} (expected a number)")
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        number = math.nan
    if not math.isfinite(number) or number < low or (below is not None and number >= below):
        bounds = f"in [{low:g}, {below:g})" if below is not None else f">= {low:g}"
        raise ValueError(f"Invalid {what}: {value!r} (must be finite and {bounds})")
    return number


def _fill_optimizer(opt, lib, prefix: str, optimizer, momentum, nesterov, weight_decay, betas, eps,
                    max_grad_norm) -> None:
    """Check an optimizer's keywords (torch.optim's rules and messages) and write them into the C struct."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}")
    if not isinstance(nesterov, (bool, np.bool_)):
        raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
    momentum = _hyperparameter(momentum, "momentum value")
    if optimizer != "sgd" and (momentum != 0 or nesterov):
        raise ValueError(f"momentum and nesterov are SGD's; {optimizer} keeps moments of its own (betas)")
    if nesterov and momentum <= 0:
        raise ValueError("Nesterov momentum requires a momentum (> 0) and zero dampening")
    if weight_decay is None:
        weight_decay = 1e-2 if optimizer == "adamw" else 0.0
    weight_decay = _hyperparameter(weight_decay, "weight_decay value")
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of numbers (beta1, beta2), got {betas!r}") from None
    beta1 = _hyperparameter(beta1, "beta parameter at index 0", below=1.0)
    beta2 = _hyperparameter(beta2, "beta parameter at index 1", below=1.0)
    eps = _hyperparameter(eps, "epsilon value")
    if max_grad_norm is None:
        clip = 0.0
    else:
        clip = _hyperparameter(max_grad_norm, "max_grad_norm")
        if clip <= 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be > 0, or None for no clipping)")
    opt.kind = getattr(lib, f"{prefix}_{optimizer}")
    opt.momentum, opt.nesterov, opt.weight_decay = momentum, int(bool(nesterov)), weight_decay
    opt.beta1, opt.beta2, opt.eps, opt.max_grad_norm = beta1, beta2, eps, clip


def make_model_class(ext_module, meta: dict) -> type:
    """The Model class of one generated network."""
    return type("Model", (ModelBase,), {"_ffi": ext_module.ffi, "_lib": ext_module.lib, "_meta": meta,
                                        "__doc__": f"Network {meta['network']} compiled by convdsl."})
