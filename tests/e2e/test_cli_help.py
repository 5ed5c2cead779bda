"""`convdsl --help` and `--version` tell a new user what they need: the FILE arguments, the
environment variables, what compile writes."""
from __future__ import annotations

import subprocess
import sys

import pytest

import convdsl
from convdsl.cli import main


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_version_prints_the_package_version():
    proc = subprocess.run([sys.executable, "-m", "convdsl", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"convdsl {convdsl.__version__}"


def test_main_help_names_the_environment_variables_and_commands(capsys):
    text = help_text(capsys)
    for word in ("OMP_NUM_THREADS", "CONVDSL_CACHE_DIR", "CC ", "--version", "check", "compile", "convert",
                 "make -C build"):
        assert word in text, word


@pytest.mark.parametrize("command", ["check", "compile", "convert"])
def test_file_argument_is_explained(capsys, command):
    text = help_text(capsys, command)
    assert "FILE" in text and "a .cnn source file" in text


def test_compile_help_says_what_it_writes(capsys):
    text = help_text(capsys, "compile")
    for word in ("NAME.c", "NAME.h", "NAME.py", "Makefile", "libNAME.a", "libNAME.so", "DEMO=", "OMP_NUM_THREADS",
                 "CONVDSL_CACHE_DIR"):
        assert word in text, word
