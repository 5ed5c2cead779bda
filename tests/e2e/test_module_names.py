"""A network's module name (its name lower-cased) must import as that network: not hide a
standard-library module or a dependency, and not be shared by two networks of one file."""
from __future__ import annotations

import os
import re
import subprocess
import sysconfig
import sys
from pathlib import Path

import pytest

import convdsl
from convdsl import ConvDSLError

BODY = "{\n    input x: [3, 8, 8]\n    y = x -> relu\n    output y\n}\n"


@pytest.mark.parametrize("name, hidden", [("os", "the standard library's `os`"),
                                          ("Json", "the standard library's `json`"),
                                          ("numpy", "`numpy`, which convdsl"),
                                          ("Cffi", "`cffi`, which convdsl"),
                                          ("Convdsl", "`convdsl` itself")])
def test_a_module_name_that_hides_another_module_is_refused(name, hidden):
    with pytest.raises(ConvDSLError) as info:
        convdsl.load_source(f"network {name} " + BODY, path="net.cnn")
    e = info.value
    assert (e.span.line, e.span.col, e.span.end_col) == (1, 9, 9 + len(name))
    assert f"would be a Python module named `{name.lower()}`" in e.message
    assert hidden in e.message
    assert f"e.g. `{name}Net`" in e.message


def test_module_names_that_differ_only_in_case_collide():
    text = f"network Net {BODY}\nnetwork NET {BODY}"
    with pytest.raises(ConvDSLError) as info:
        convdsl.load_source(text, network="Net", path="two.cnn")
    e = info.value
    assert (e.span.line, e.span.col) == (7, 9)
    assert "`Net` (line 1) and `NET` would both be the Python module `net`" in e.message


def test_compile_writes_nothing_for_a_refused_name(tmp_path):
    src = tmp_path / "os.cnn"
    src.write_text("network os " + BODY)
    out = tmp_path / "build"
    proc = subprocess.run([sys.executable, "-m", "convdsl", "compile", str(src), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{src}:1:9: error: network `os` would be a Python module named `os`")
    assert "Traceback" not in proc.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_names_near_a_module_name_are_fine():
    mod = convdsl.load_source("network OsNet " + BODY)
    assert mod.META["prefix"] == "osnet"


@pytest.mark.parametrize("name, function", [("timer", "timer_create"), ("Pthread", "pthread_create"),
                                            ("pthread_mutex", "pthread_mutex_destroy"),
                                            ("sem", "sem_destroy"), ("thrd", "thrd_create"),
                                            ("Epoll", "epoll_create")])
def test_a_network_whose_c_api_would_define_a_c_library_function_is_refused(name, function):
    # `network timer` once reached the C compiler: its `timer_create` clashed with <time.h>'s.
    with pytest.raises(ConvDSLError) as info:
        convdsl.load_source(f"network {name} " + BODY, path="net.cnn")
    e = info.value
    assert (e.span.line, e.span.col) == (1, 9)
    assert f"would define the C function `{function}`, which the C library already declares" in e.message


def test_the_api_suffixes_are_the_ones_the_header_declares():
    from convdsl import resources
    from convdsl.codegen.render import API_SUFFIXES
    header = (resources.templates_dir() / "c" / "header.h.j2").read_text()
    declared = set(re.findall(r"\{\{ prefix \}\}_([a-z_]+)", header))
    assert declared == set(API_SUFFIXES)


HEADERS = ("Python.h", "assert.h", "errno.h", "math.h", "signal.h", "stdint.h", "stdio.h", "stdlib.h",
           "string.h", "threads.h", "time.h", "pthread.h", "semaphore.h", "spawn.h", "unistd.h",
           "fcntl.h", "sys/mman.h", "sys/stat.h", "omp.h")


def test_the_c_library_function_list_covers_what_the_headers_declare(tmp_path):
    from convdsl.codegen.render import API_SUFFIXES, C_LIBRARY_FUNCTIONS
    src = tmp_path / "headers.c"
    src.write_text("".join(f"#include <{h}>\n" for h in HEADERS))
    include = sysconfig.get_paths()["include"]
    proc = subprocess.run(["gcc", "-fopenmp", "-E", "-I", include, str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pattern = r"\b([a-z][a-z0-9_]*_(?:" + "|".join(API_SUFFIXES) + r"))\s*\("
    declared = set(re.findall(pattern, proc.stdout))
    assert "timer_create" in declared               # the test sees what it looks for
    assert declared <= C_LIBRARY_FUNCTIONS, sorted(declared - C_LIBRARY_FUNCTIONS)


def test_the_c_library_function_list_covers_what_libc_exports():
    from convdsl.codegen.render import API_SUFFIXES, C_LIBRARY_FUNCTIONS
    libc = subprocess.run(["gcc", "-print-file-name=libc.so.6"], capture_output=True, text=True).stdout.strip()
    proc = subprocess.run(["nm", "-D", "--defined-only", os.path.realpath(libc)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = {line.split()[-1].split("@")[0] for line in proc.stdout.splitlines() if line.strip()}
    pattern = re.compile(r"[a-z][a-z0-9_]*_(?:" + "|".join(API_SUFFIXES) + r")")
    exported = {n for n in names if pattern.fullmatch(n)}
    assert "pthread_create" in exported              # the test sees what it looks for
    assert exported <= C_LIBRARY_FUNCTIONS, sorted(exported - C_LIBRARY_FUNCTIONS)
