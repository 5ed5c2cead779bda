"""The generated C compiles without a single warning: `-std=c11 -Wall -Wextra -Werror` with the
flags of a real build (-O3 -march=native -fopenmp …), since some warnings appear only when the
optimiser runs. Shared by the op tests, the examples and the identifier tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

from convdsl.compiler import compile_graph, graph_from_source
from convdsl.runtime.build import c_flags, compiler

STRICT = ("-std=c11", "-Wall", "-Wextra", "-Werror")


def assert_generated_c_compiles_cleanly(code, tmp_path: Path, optimised: bool = True) -> None:
    """`code` is a CSource (compile_graph(...).source). Compiled at -O3 whatever level the suite
    builds its modules at (tests/conftest.py): some warnings appear only when the optimiser runs.
    `optimised=False` only parses and checks it (-fsyntax-only: C11 and every warning that needs
    no optimiser, in a tenth of the time), for C whose -O3 build a test makes anyway."""
    (tmp_path / f"{code.prefix}.h").write_text(code.h)
    c_file = tmp_path / f"{code.prefix}.c"
    c_file.write_text(code.c)
    flags = ["-O3" if f.startswith("-O") else f for f in c_flags()]
    output = ["-c", "-o", str(tmp_path / "net.o")] if optimised else ["-fsyntax-only"]
    proc = subprocess.run([compiler(), *flags, *STRICT, str(c_file), *output],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def assert_c_compiles_cleanly(src: str, tmp_path: Path) -> None:
    """The C generated for this .cnn text compiles without warnings."""
    assert_generated_c_compiles_cleanly(compile_graph(graph_from_source(src)).source, tmp_path)
