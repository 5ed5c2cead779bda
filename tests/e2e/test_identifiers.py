"""Names from the .cnn file never collide with the generated C's own (issue 7): the rules of
convdsl/codegen/render.py's comment, checked over every template, and networks whose names
once made the C compiler reject the generated code, compiled and run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convdsl
from convdsl.codegen.render import layer_function
from backends import requires_opencl
from ccheck import assert_c_compiles_cleanly

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "templates" / "c"


def public_suffixes() -> set[str]:
    """Every `<prefix>_<suffix>` the header declares: functions, the model struct, the real type."""
    header = (TEMPLATES / "header.h.j2").read_text()
    return set(re.findall(r"\{\{ prefix \}\}_(\w+)", header))


def helper_names() -> set[str]:
    names = set()
    for path in TEMPLATES.rglob("*.j2"):
        names |= set(re.findall(r"\bcdsl_\w+", path.read_text()))
    return names


def test_public_names_are_lower_case():
    suffixes = public_suffixes()
    assert {"create", "loss", "forward", "backward", "train_step", "real", "model"} <= suffixes
    assert all(s == s.lower() for s in suffixes)


def test_no_helper_can_be_taken_for_a_public_name():
    """A helper `cdsl_…` equals `<prefix>_<suffix>` only if it ends in `_<suffix>`: none does,
    and none has an upper-case letter, which every layer function has."""
    suffixes = public_suffixes()
    helpers = helper_names()
    assert "cdsl_gemm" in helpers and "cdsl_loss_kernel" in helpers
    clashes = sorted(h for h in helpers for s in suffixes if h.endswith("_" + s))
    assert not clashes, f"these helpers would collide with a network's C API: {clashes}"
    assert all(h == h.lower() for h in helpers), sorted(h for h in helpers if h != h.lower())


def test_layer_functions_are_apart_from_each_other_and_from_public_names():
    assert layer_function(0, "l") == "cdsl_L0_l"
    assert layer_function(12, "inception1.conv3") == "cdsl_L12_inception1_conv3"
    # An id (digits, then `_`) and a label that cannot start with a digit decode uniquely.
    names = [layer_function(i, label) for i in (0, 1, 11, 110) for label in ("a", "a_1", "_1", "cdsl_L0_a")]
    assert len(set(names)) == len(names)
    assert any(c.isupper() for c in layer_function(0, "x"))


def train_once(module, shape) -> float:
    net = module.Model(seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    y = net.forward(x)
    net.backward(np.ones_like(y))
    if module.META["loss"] is None:
        return 0.0
    return net.train_step(x, rng.standard_normal(y.shape).astype(np.float32), lr=0.01)


NETWORKS = {
    # the public `cdsl_loss` once met the loss helper `cdsl_loss`
    "cdsl-with-a-loss": "network cdsl {\n input x: [1, 4, 4]\n y = x -> conv(2, kernel=3, pad=same)\n"
                        " output y\n loss mse(y)\n}\n",
    # the public `n0_l_forward` once met the first layer's `n0_l_forward`
    "n0_l-first-layer-l": "network n0_l {\n input x: [1, 4, 4]\n layer l = conv(2, kernel=1)\n"
                          " y = x -> l -> relu\n output y\n loss mse(y)\n}\n",
    # layers named like the helpers, C keywords and libc functions; a network named like a C type
    "float-with-helper-names": "network float {\n input x: [1, 4, 4]\n layer real = conv(2, kernel=3, pad=same)\n"
                               " layer int = relu\n layer main = tanh\n layer free = conv(2, kernel=1)\n"
                               " layer model_t = sigmoid\n layer cdsl_gemm = relu\n layer cdsl_L0_real = relu\n"
                               " y = x -> real -> int -> main -> free -> model_t -> cdsl_gemm -> cdsl_L0_real\n"
                               " output y\n loss mse(y)\n}\n",
    "model_t": "network model_t {\n input x: [1, 4, 4]\n layer cdsl = conv(2, kernel=1)\n y = x -> cdsl\n"
               " output y\n loss mse(y)\n}\n",
}


@pytest.mark.parametrize("name", NETWORKS)
def test_networks_named_like_generated_identifiers_compile_and_run(name, tmp_path):
    src = NETWORKS[name]
    assert_c_compiles_cleanly(src, tmp_path)
    loss = train_once(convdsl.load_source(src), (2, 1, 4, 4))
    assert np.isfinite(loss)


# On OpenCL the names reach an OpenCL C program too: layers named like its address spaces and
# qualifiers, its vector types and built-ins, the program's own typedefs (`real`, `acc_t`) and
# the kernels' arguments (`i`, `batch`, `dim`), in a network named `kernel`.
OPENCL_NAMES = ("network kernel {\n input x: [1, 4, 4]\n layer global = conv(2, kernel=3, pad=same)\n"
                " layer constant = relu\n layer private = tanh\n layer half = relu\n layer float4 = conv(2, kernel=1)\n"
                " layer get_global_id = sigmoid\n layer barrier = relu\n layer acc_t = relu\n layer real = relu\n"
                " layer i = relu\n layer batch = relu\n layer dim = relu\n layer cdsl_L0_real = relu\n"
                " y = x -> global -> constant -> private -> half -> float4 -> get_global_id -> barrier -> acc_t -> real"
                " -> i -> batch -> dim -> cdsl_L0_real\n output y\n loss mse(y)\n}\n")


OPENCL_NETWORKS = {"float-with-helper-names": NETWORKS["float-with-helper-names"], "opencl-names": OPENCL_NAMES}


@requires_opencl
@pytest.mark.parametrize("name", OPENCL_NETWORKS)
def test_networks_named_like_generated_identifiers_run_on_opencl(name):
    loss = train_once(convdsl.load_source(OPENCL_NETWORKS[name], backend="opencl"), (2, 1, 4, 4))
    assert np.isfinite(loss)


def test_a_network_named_after_a_library_function_family_runs(tmp_path):
    """`network acc` has a C API function `acc_create`, which libgomp (loaded with every module)
    also exports. Exported from the extension, such a name was bound to the library's own at load
    time and the first call crashed the process, as `network pthread` did before the C library's
    names were refused (so: a subprocess)."""
    src = "network acc {\n input x: [1, 4, 4]\n y = x -> relu\n output y\n loss mse(y)\n}\n"
    code = ("import numpy as np, convdsl\n"
            f"net = convdsl.load_source({src!r}).Model(seed=0)\n"
            "y = net.forward(np.ones((1, 1, 4, 4), np.float32))\n"
            "print('loss', net.train_step(np.ones((1, 1, 4, 4), np.float32), np.zeros_like(y), lr=0.1))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss" in proc.stdout
