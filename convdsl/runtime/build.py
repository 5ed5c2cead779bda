"""Compile generated C into a shared library, cached by content hash and published atomically,
and load it through cffi's ABI mode (`ffi.dlopen` with the header's declarations).

The library is the network's plain C API, nothing of Python in it: no wrapper module is
generated or compiled. That wrapper (cffi's API mode: Python.h and a converter per function)
took as long to compile as a small network's own code at -O1 (0.48 s of 0.79 s for a one-relu
network; measured with gcc 12), and a call through libffi costs about 0.04 µs more than one
through it (0.13 µs against 0.09 µs for an argument-less call): nothing next to a forward.

A network that calls the kernel library (templates/c/kernels.c.j2: the GEMM, the same source
for every network of an element type) links it as an object
compiled once per flags and cached beside the modules (kernel_object), rather than compiling
it again into each network.

The cache key covers everything that changes the binary: the C source and declarations,
the kernel library it links, the compiler flags and version and the CPU (for -march=native). A build
happens in a temporary folder on the cache's filesystem and is moved into place with
os.replace, so concurrent processes either see a complete module or none.

A cached file is trusted only if it matches its manifest (`<module>.so.manifest.json`: size
and sha256, written after the module and published last). A truncated, emptied or garbled
module — a full disk, a crash mid-copy, a stray tool — is rebuilt instead of being loaded,
where it would raise SIGBUS, SIGILL or an ImportError on every later run. Hashing a module
of a few hundred KB costs well under a millisecond; a module already imported by this
process is not hashed again.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import types
import warnings
from pathlib import Path

from ..errors import ConvDSLError

# -fno-wrapv: Python's own CFLAGS carry -fwrapv, which stopped gcc from vectorising conv loops.
# -fno-semantic-interposition (and -Bsymbolic when linking): the library exports its C API, and
# its calls to its own functions bind to its own definitions, never to a same-named function of
# another library loaded first (`acc_create` is libgomp's too; exported and interposable, a
# network named `pthread` once had its `pthread_create` bound to libc's, and the first call
# crashed). It is opened with RTLD_LOCAL, so it interposes nothing of anyone else either.
# -fno-math-errno: no generated code reads errno after a math function, and the path that would
# set it is a branch in every loop calling sqrt: Adam's update loop (lib/optimizer.c.j2) was not
# vectorised for it ("control flow in loop"), and is with it (gcc 12, -O3 -march=native).
C_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-wrapv", "-fPIC", "-fno-semantic-interposition",
           "-fno-math-errno")
# The generated code compiles without a warning under these; any warning a build still prints is
# shown as a CompilerWarning (an error in the test suite), never dropped. They change no code.
WARNING_FLAGS = ("-Wall", "-Wextra")
LINK_FLAGS = ("-shared", "-Wl,-Bsymbolic", "-lm")
# CONVDSL_SANITIZE=1 builds every module with AddressSanitizer and UndefinedBehaviorSanitizer,
# at -O0: the instrumentation is the same as at -O1 and the reports' stacks are whole, and gcc
# compiles an instrumented network ten times faster (the sanitizer test's network of every
# kernel family, 390 KB of C: 5.6 s of CPU at -O0 -g, 60 s at -O1 -g, where variable tracking
# over the instrumented code overflows its limits and starts again). The generated C then puts
# poisoned guard zones between the regions of its activation arena, so that an overrun from one
# region into the next is reported too. Loading such a module needs libasan first in the
# process: see tests/sanitize.sh and docs/testing.md.
# CONVDSL_SANITIZE may also name the checks, as gcc's -fsanitize= list: it must hold `address`
# (the guard zones are ASan's), e.g. `address,signed-integer-overflow,shift,bounds` — the
# sanitizer sweep of the op tests' networks (tests/op_networks.py) builds its forced variants'
# networks with UBSan less its null, alignment and pointer-overflow checks, the costly ones
# (test_conv's network of 64 cases: 14.8 s to compile where all of UBSan took 23.4 s, 3.8 s
# without sanitizers), which find what ASan reports anyway when the pointer is used.
SANITIZE_FLAGS = ("-O0", "-g", "-fno-omit-frame-pointer")
SANITIZERS = "address,undefined"
# The OpenCL backend's host code (templates/opencl/module.cl.j2) calls the OpenCL C API through
# the ICD loader, which finds the installed drivers (PoCL, a GPU's) at run time; it has no
# OpenMP loops of its own (-fopenmp among the link flags, which share gcc's one command line with
# the compile flags, once compiled its host code with OpenMP after all).
BACKEND_LINK_FLAGS = {"c": ("-fopenmp",), "opencl": ("-lOpenCL",)}


# CONVDSL_OPT=-O1 (or -O0, -O2, -Os) builds modules at that level instead of -O3: a third of the
# compile time, for while a network is being written and for the test suite (tests/conftest.py),
# which keeps -O3 where the optimiser matters (every example, the -Werror checks). Part of the
# cache key through the flags, so builds at two levels never mix.
OPT_ENV = "CONVDSL_OPT"
OPT_LEVELS = ("-O0", "-O1", "-O2", "-O3", "-Os")
# gcc contracts a * b + c into a fused multiply-add only where -fexpensive-optimizations is on
# (from -O2, by default). -O1 turns it on too, at no measurable compile time (rnd8 of the
# random-network campaign: 2.46 s at -O1, 2.40 s with it, 3.40 s at -O2), so that a network
# rounds at -O1 as at -O3 and as PyTorch's kernels do: without it, an ill-conditioned f32
# gradient (a training-mode batchnorm after tanh at batch 1) came out 29 times PyTorch's error.
LEVEL_EXTRAS = {"-O1": ("-fexpensive-optimizations",)}


# CONVDSL_MARCH=x86-64-v3 (any gcc -march name) builds for that instruction set instead of this
# machine's (-march=native): a module for another machine, or the AVX2 and SSE2 forms of the
# kernels tested on an AVX-512 one (tests/e2e/test_instruction_sets.py). Part of the cache key
# through the flags.
MARCH_ENV = "CONVDSL_MARCH"


def march() -> str:
    value = os.environ.get(MARCH_ENV, "") or "native"
    if not re.fullmatch(r"[a-z0-9][a-z0-9._+-]{0,63}", value):
        raise ConvDSLError(None, f"{MARCH_ENV}={value!r} is not a gcc -march name (e.g. native, x86-64-v3, armv8-a)")
    return f"-march={value}"


def sanitizing() -> bool:
    return os.environ.get("CONVDSL_SANITIZE", "") not in ("", "0")


def sanitizers() -> str:
    """The -fsanitize= list of a sanitizer build: SANITIZERS for CONVDSL_SANITIZE=1, else the
    list it names (checked: gcc's names, `address` among them)."""
    value = os.environ.get("CONVDSL_SANITIZE", "")
    if value == "1":
        return SANITIZERS
    names = value.split(",")
    if "address" not in names or not all(re.fullmatch(r"[a-z][a-z-]*", n) for n in names):
        raise ConvDSLError(None, f"CONVDSL_SANITIZE={value!r}: use 1, or a -fsanitize= list of gcc's check "
                                 f"names that holds `address` (e.g. address,undefined)")
    return value


def optimisation() -> str:
    level = os.environ.get(OPT_ENV, "") or "-O3"
    if level not in OPT_LEVELS:
        raise ConvDSLError(None, f"{OPT_ENV}={level!r} is not an optimisation level; use one of "
                                 + ", ".join(OPT_LEVELS))
    return level


def c_flags(backend: str = "c") -> tuple[str, ...]:
    """The compile flags of a build now: C_FLAGS at the level CONVDSL_OPT asks (-O3 by default),
    or with the sanitizers at theirs, for the instruction set CONVDSL_MARCH names (this
    machine's by default); the OpenCL host code without OpenMP."""
    plain = tuple(march() if f == "-march=native" else f for f in C_FLAGS
                  if not f.startswith("-O") and (backend == "c" or f != "-fopenmp"))
    if sanitizing():
        return plain + SANITIZE_FLAGS + (f"-fsanitize={sanitizers()}",) + WARNING_FLAGS
    level = optimisation()
    return (level, *LEVEL_EXTRAS.get(level, ())) + plain + WARNING_FLAGS


def link_flags(backend: str = "c") -> tuple[str, ...]:
    if backend not in BACKEND_LINK_FLAGS:
        raise ConvDSLError(None, f"unknown backend {backend!r}; known: {', '.join(BACKEND_LINK_FLAGS)}")
    return (LINK_FLAGS + BACKEND_LINK_FLAGS[backend]
            + ((f"-fsanitize={sanitizers()}",) if sanitizing() else ()))


class CompilerWarning(UserWarning):
    """The C compiler accepted the generated code but warned about it: a convdsl bug to report
    (the test suite turns this warning into an error)."""


def cache_root() -> Path:
    env = os.environ.get("CONVDSL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convdsl"


def _cache_problem(root: Path, error: Exception) -> ConvDSLError:
    """A cache folder that cannot be used, said in terms of the setting that chose it."""
    if isinstance(error, OSError) and root.is_file():
        reason = "it is a file, not a folder"
    elif isinstance(error, OSError):
        reason = error.strerror or str(error)
        if error.filename and os.fspath(error.filename) != str(root):
            reason += f" ({error.filename})"
    else:
        reason = str(error)                      # a NUL byte in the path and the like
    if os.environ.get("CONVDSL_CACHE_DIR"):
        return ConvDSLError(None, f"CONVDSL_CACHE_DIR={root} cannot hold the build cache: {reason}; "
                                  f"point it at a writable folder, or unset it")
    return ConvDSLError(None, f"the build cache {root} cannot be used: {reason}; "
                              f"set CONVDSL_CACHE_DIR to a writable folder")


def compiler() -> str:
    return os.environ.get("CC", "cc")


@functools.lru_cache(maxsize=None)
def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConvDSLError(None, f"cannot run the C compiler `{cc}`: {e}; install gcc or set CC") from None
    return out.stdout.splitlines()[0] if out.stdout else cc


@functools.lru_cache(maxsize=1)
def _cpu_id() -> str:
    parts = [platform.machine()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                parts.append(line)
                if len(parts) >= 3:
                    break
    except OSError:
        pass
    return "\n".join(parts)


def cache_key(*texts: str, backend: str = "c") -> str:
    h = hashlib.sha256()
    for part in (*texts, backend, "\0".join(c_flags(backend) + link_flags(backend)), _compiler_version(compiler()), _cpu_id(),
                 "convdsl-build-4"):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


# The network's name is part of the module's name only up to here: the cache key makes the
# name unique, and a file name has at most 255 bytes.
NAME_IN_PATH = 40


def library_path(prefix: str, key: str) -> Path:
    return cache_root() / key[:2] / key / f"lib{prefix[:NAME_IN_PATH]}_{key[:16]}.so"


def manifest_path(target: Path) -> Path:
    return target.with_name(target.name + ".manifest.json")


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read through one open file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _matches_manifest(target: Path) -> bool:
    """Whether the cached module is whole: its size and hash are the ones recorded at build."""
    try:
        recorded = json.loads(manifest_path(target).read_text())
        size, sha256 = file_digest(target)
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded.get("size") == size and recorded.get("sha256") == sha256


def build_library(prefix: str, c_source: str, header: str, cdef: str, backend: str = "c",
                  kernels=None) -> Path:
    """Return the path of the network's shared library, compiling only on a cache miss or when
    the cached file does not match its manifest. The backend (`c`, `opencl`) is part of the
    key, with its flags; `cdef` (the header as cffi reads it) too, since loading needs it.
    `kernels` (a targets.base.KernelLibrary, or None) is the kernel library the source calls:
    compiled once per flags into an object of its own (kernel_object) and linked in."""
    key = cache_key(c_source, header, cdef, kernels.c if kernels is not None else "", backend=backend)
    target = library_path(prefix, key)
    if str(target) in _LOADED or _matches_manifest(target):
        return target
    objects = (kernel_object(kernels, backend),) if kernels is not None else ()
    root = cache_root()
    work = _work_folder(root)
    try:
        _build_in(work, prefix, key, target, c_source, header, backend, objects)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG and len(prefix) > NAME_IN_PATH:
            raise ConvDSLError(None, f"the network name is too long to build ({len(prefix)} characters): "
                                     f"the C source includes `<name>.h`, a file name the system refuses; "
                                     f"shorten the name") from None
        raise _cache_problem(root, e) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _work_folder(root: Path) -> Path:
    """A fresh temporary folder for one build, on the cache's filesystem (so that os.replace
    publishes its result atomically)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="build-", dir=root))
    except (OSError, ValueError) as e:
        raise _cache_problem(root, e) from None


def _compile(cmd: list[str], work: Path, key: str, what: str) -> None:
    """Run the C compiler in `work`; a refusal is a ConvDSLError and a warning a CompilerWarning,
    each with the compiler's output in a log beside the cache."""
    try:
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConvDSLError(None, f"cannot run the C compiler `{cmd[0]}`: {e}") from None
    if proc.returncode != 0:
        log = cache_root() / f"failed-{key[:16]}.log"
        log.write_text(" ".join(cmd) + "\n\n" + proc.stderr)
        raise ConvDSLError(None, f"internal error: the C compiler rejected the generated code for {what} "
                                 f"(this is a convdsl bug; the compiler's output is in {log})")
    # A warning is never dropped: the generated code is meant to compile without one.
    if "warning:" in proc.stderr:
        log = cache_root() / f"warnings-{key[:16]}.log"
        log.write_text(" ".join(cmd) + "\n\n" + proc.stderr)
        warnings.warn(CompilerWarning(f"the C compiler warned about the generated code for {what} "
                                      f"(a convdsl bug; its output is in {log}):\n{proc.stderr.strip()[:2000]}"),
                      stacklevel=4)


def _publish(built: Path, target: Path, work: Path) -> None:
    """Move a finished build into the cache: the file first and its manifest (size, sha256)
    last, both atomically, so that a reader that finds a manifest finds the whole file it
    describes (or, mid-rebuild, a file it does not describe: a rebuild)."""
    size, sha256 = file_digest(built)
    (work / "manifest.json").write_text(json.dumps({"file": target.name, "size": size, "sha256": sha256}))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(built, target)
    os.replace(work / "manifest.json", manifest_path(target))


_KERNEL_OBJECTS: set[str] = set()     # kernel objects this process built or checked


def kernel_object(kernels, backend: str = "c") -> Path:
    """The kernel library (templates/c/kernels.c.j2) compiled with this build's flags into a
    position-independent object, cached like a module: keyed by its source, the flags, the
    compiler and the CPU, published atomically, checked against its manifest before each use
    and rebuilt when damaged. Every network of the element type links the same object, so
    the GEMM is compiled once per flags rather than once a network."""
    key = cache_key(kernels.c, backend=backend)
    target = cache_root() / "kernels" / f"{kernels.name}_{key[:16]}.o"
    if str(target) in _KERNEL_OBJECTS or _matches_manifest(target):
        _KERNEL_OBJECTS.add(str(target))
        return target
    work = _work_folder(cache_root())
    try:
        (work / f"{kernels.name}.c").write_text(kernels.c)
        _compile([compiler(), *c_flags(backend), "-c", f"{kernels.name}.c", "-o", target.name], work, key,
                 f"the kernel library {kernels.name}")
        _publish(work / target.name, target, work)
    except OSError as e:
        raise _cache_problem(cache_root(), e) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _KERNEL_OBJECTS.add(str(target))
    return target


def _build_in(work: Path, prefix: str, key: str, target: Path, c_source: str, header: str,
              backend: str = "c", objects: tuple[Path, ...] = ()) -> None:
    (work / f"{prefix}.h").write_text(header)     # the generated C includes it by this name
    (work / "network.c").write_text(c_source)
    # Relative names, run inside the build folder: the temporary folder's name does not end
    # up in the binary, so every build of one key is byte for byte the same file. (The kernel
    # object's path is only read by the linker.)
    cmd = [compiler(), *c_flags(backend), "-I.", "network.c", *map(str, objects), "-o", target.name,
           *link_flags(backend)]
    _compile(cmd, work, key, prefix)
    built = work / target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    for name, published in (("network.c", "network.c"), (f"{prefix}.h", "network.h")):
        with contextlib.suppress(OSError):        # copies to read; the module does not need them
            os.replace(work / name, target.parent / published)
    _publish(built, target, work)


_LOADED: dict[str, object] = {}


def load_library(path: Path, cdef: str, size: int | None = None, sha256: str | None = None):
    """Open a compiled network's shared library: an object with `ffi` (cffi, declarations from
    `cdef`) and `lib` (its C API). One per file per process.

    With `size` and `sha256` (what `convdsl compile` writes into the generated module), a
    damaged file is refused with an ImportError instead of being handed to the loader."""
    import cffi
    key = str(path)
    if key not in _LOADED:
        if size is not None or sha256 is not None:
            try:
                found = file_digest(Path(path))
            except OSError as e:
                raise ImportError(f"cannot read the compiled network {path}: {e.strerror}") from None
            if found != (size, sha256):
                raise ImportError(f"{path} is damaged ({found[0]} bytes, expected {size}; "
                                  f"its sha256 differs from the one recorded at compile time): "
                                  f"run `convdsl compile` again")
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        try:
            lib = ffi.dlopen(key)
        except OSError as e:
            raise ImportError(f"cannot load the compiled network {path}: {e}") from None
        _LOADED[key] = types.SimpleNamespace(ffi=ffi, lib=lib)
    return _LOADED[key]
