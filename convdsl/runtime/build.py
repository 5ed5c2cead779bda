"""Compile generated C into a cffi extension, cached by content hash and published atomically.

The cache key covers everything that changes the binary: the C source and declarations,
the compiler flags and version, the CPU (for -march=native) and the Python ABI. A build
happens in a temporary folder on the cache's filesystem and is moved into place with
os.replace, so concurrent processes either see a complete module or none.
"""
from __future__ import annotations

import contextlib
import functools
import io
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

from ..errors import ConvDSLError

# -fno-wrapv: Python's own CFLAGS carry -fwrapv, which stopped gcc from vectorising conv loops.
# -fvisibility=hidden: the network's C API stays inside the extension (cffi's module entry point
# is exported by Python's PyMODINIT_FUNC). Exported, a network named `pthread` had its
# `pthread_create` bound to libc's at load time, and the first call crashed.
C_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-wrapv", "-fPIC", "-fvisibility=hidden")
# The generated code compiles without a warning under these; any warning a build still prints is
# shown as a CompilerWarning (an error in the test suite), never dropped. They change no code.
WARNING_FLAGS = ("-Wall", "-Wextra")
LINK_FLAGS = ("-shared", "-fopenmp", "-lm")
# CONVDSL_SANITIZE=1 builds every module with AddressSanitizer and UndefinedBehaviorSanitizer
# (-O1 keeps the reports' stacks readable). The generated C then puts poisoned guard zones
# between the regions of its activation arena, so that an overrun from one region into the
# next is reported too. Loading such a module needs libasan first in the process: see
# tests/sanitize.sh and docs/testing.md.
SANITIZE_FLAGS = ("-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer")


def sanitizing() -> bool:
    return os.environ.get("CONVDSL_SANITIZE", "") not in ("", "0")


def c_flags() -> tuple[str, ...]:
    """The compile flags of a build now: C_FLAGS, or with the sanitizers their -O3 replaced."""
    if sanitizing():
        return tuple(f for f in C_FLAGS if not f.startswith("-O")) + SANITIZE_FLAGS + WARNING_FLAGS
    return C_FLAGS + WARNING_FLAGS


def link_flags() -> tuple[str, ...]:
    return LINK_FLAGS + (("-fsanitize=address,undefined",) if sanitizing() else ())


class CompilerWarning(UserWarning):
    """The C compiler accepted the generated code but warned about it: a convdsl bug to report
    (the test suite turns this warning into an error)."""


def cache_root() -> Path:
    env = os.environ.get("CONVDSL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convdsl"


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


def cache_key(*texts: str) -> str:
    import cffi
    h = hashlib.sha256()
    for part in (*texts, "\0".join(c_flags() + link_flags()), _compiler_version(compiler()), _cpu_id(),
                 sys.implementation.cache_tag or "", sysconfig.get_config_var("EXT_SUFFIX") or "",
                 cffi.__version__, "convdsl-build-2"):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def extension_path(prefix: str, key: str) -> tuple[str, Path]:
    ext_name = f"_{prefix}_{key[:16]}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return ext_name, cache_root() / key[:2] / key / f"{ext_name}{suffix}"


def build_extension(prefix: str, c_source: str, header: str, cdef: str) -> tuple[str, Path]:
    """Return (extension module name, path to the shared object), compiling only on a cache miss."""
    key = cache_key(c_source, header, cdef)
    ext_name, target = extension_path(prefix, key)
    if target.exists():
        return ext_name, target
    import cffi
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        (work / f"{prefix}.h").write_text(header)
        (work / f"{prefix}.c").write_text(c_source)
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        ffi.set_source(ext_name, f'#include "{prefix}.h"\n#include "{prefix}.c"\n')
        wrapper = work / f"{ext_name}.c"
        with contextlib.redirect_stdout(io.StringIO()):    # cffi announces "generating …"
            ffi.emit_c_code(str(wrapper))
        built = work / target.name
        cmd = [compiler(), *c_flags(), f"-I{sysconfig.get_paths()['include']}", f"-I{work}", str(wrapper),
               "-o", str(built), *link_flags()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ConvDSLError(None, f"cannot run the C compiler `{cmd[0]}`: {e}") from None
        if proc.returncode != 0:
            log = root / f"failed-{key[:16]}.log"
            log.write_text(" ".join(cmd) + "\n\n" + proc.stderr)
            raise ConvDSLError(None, f"internal error: the C compiler rejected the generated code for {prefix} "
                                     f"(this is a convdsl bug; the compiler's output is in {log})")
        # A warning is never dropped: the generated code is meant to compile without one.
        if "warning:" in proc.stderr:
            log = root / f"warnings-{key[:16]}.log"
            log.write_text(" ".join(cmd) + "\n\n" + proc.stderr)
            warnings.warn(CompilerWarning(f"the C compiler warned about the generated code for {prefix} "
                                          f"(a convdsl bug; its output is in {log}):\n{proc.stderr.strip()[:2000]}"),
                          stacklevel=2)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(built, target)        # atomic: readers see all of the file or none of it
        for name in (f"{prefix}.c", f"{prefix}.h"):
            tmp = work / name
            try:
                os.replace(tmp, target.parent / name)
            except OSError:
                pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ext_name, target


_LOADED: dict[str, object] = {}


def load_extension(ext_name: str, path: Path):
    """Import a compiled extension from its file; one module object per file per process."""
    key = str(path)
    if key not in _LOADED:
        loader = importlib.machinery.ExtensionFileLoader(ext_name, key)
        spec = importlib.util.spec_from_file_location(ext_name, key, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        _LOADED[key] = module
    return _LOADED[key]
