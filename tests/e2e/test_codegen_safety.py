"""Nothing from the .cnn file reaches generated C or Python except validated identifiers."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import convdsl
from convdsl import ConvDSLError
from convdsl.codegen.render import checked_identifier, comment_safe


def test_identifiers_are_checked():
    assert checked_identifier("conv_1") == "conv_1"
    assert checked_identifier("inception1.conv3", dotted=True) == "inception1.conv3"
    for bad in ('x"); abort(); //', "a b", "1x", "", "a.b", "x*/"):
        with pytest.raises(ConvDSLError):
            checked_identifier(bad)


def test_file_names_cannot_close_a_comment_or_docstring():
    assert "*/" not in comment_safe('evil*/ system("rm"); /*.cnn')
    assert '"""' not in comment_safe('x""".cnn')


def test_a_hostile_file_name_compiles_to_inert_comments(tmp_path):
    name = 'evil*' + '/'.replace('/', '') + '"""; import os #.cnn'
    path = tmp_path / name
    path.write_text("network Probe {\n    input x: [1, 4, 4]\n    y = x -> relu\n    output y\n}\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "convdsl", "compile", str(path), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    c_text = (out / "probe.c").read_text()
    py_text = (out / "probe.py").read_text()
    assert '"""; import os' not in py_text and "evil*" not in c_text
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(out)!r}); import probe"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_strings_never_reach_generated_code():
    src = 'network A {\n    input x: [1, 4, 4]\n    y = x -> conv(2, kernel=1, init="); abort(); //")\n    output y\n}\n'
    with pytest.raises(ConvDSLError) as e:
        convdsl.load_source(src)
    assert "a string is only allowed in `use" in str(e.value)


def test_names_that_are_c_keywords_are_harmless():
    """Layer and value names never become C identifiers on their own: labels are prefixed."""
    src = ("network Static {\n    input int: [1, 4, 4]\n    layer for = conv(2, kernel=1)\n"
           "    return_ = int -> for -> relu\n    output return_\n}\n")
    module = convdsl.load_source(src)
    net = module.Model(seed=0)
    y = net.forward(np.ones((1, 1, 4, 4), dtype=np.float32))
    assert y.shape == (1, 2, 4, 4)
    assert list(net.params) == ["for.weight", "for.bias"]
