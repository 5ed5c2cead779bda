"""The generated C compiles without a single warning: `-std=c11 -Wall -Wextra -Werror` with the
flags of a real build (-O3 -march=native -fopenmp …), since some warnings appear only when the
optimiser runs. Shared by the op tests, the examples and the identifier tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

from convdsl.compiler import compile_graph, graph_from_source
from convdsl.runtime.build import c_flags, compiler

STRICT = ("-std=c11", "-Wall", "-Wextra", "-Werror")


_CHECKED_KERNELS: set[tuple] = set()     # kernel libraries this process has checked, with their flags


def assert_generated_c_compiles_cleanly(code, tmp_path: Path, optimised: bool = True) -> None:
    """`code` is a CSource (compile_graph(...).source). Compiled at -O3 whatever level the suite
    builds its modules at (tests/conftest.py): some warnings appear only when the optimiser runs.
    `optimised=False` only parses and checks it (-fsyntax-only: C11 and every warning that needs
    no optimiser, in a tenth of the time), for C whose -O3 build a test makes anyway. The kernel
    library it calls (code.kernels) is checked too, once per process and flags: it is the same
    file for every network of an element type."""
    flags = ["-O3" if f.startswith("-O") else f for f in c_flags()]
    output = ["-c", "-o", str(tmp_path / "net.o")] if optimised else ["-fsyntax-only"]
    sources = [(code.prefix, code.c)]
    if code.kernels is not None and (code.kernels.c, optimised, *flags) not in _CHECKED_KERNELS:
        sources.append((code.kernels.name, code.kernels.c))
    (tmp_path / f"{code.prefix}.h").write_text(code.h)
    for name, text in sources:
        c_file = tmp_path / f"{name}.c"
        c_file.write_text(text)
        proc = subprocess.run([compiler(), *flags, *STRICT, str(c_file), *output],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    if code.kernels is not None:
        _CHECKED_KERNELS.add((code.kernels.c, optimised, *flags))


def assert_c_compiles_cleanly(src: str, tmp_path: Path) -> None:
    """The C generated for this .cnn text compiles without warnings."""
    assert_generated_c_compiles_cleanly(compile_graph(graph_from_source(src)).source, tmp_path)
