"""layernorm (over the channels at each position), groupnorm(groups), instancenorm and prelu
against PyTorch primitives: values, input and parameter gradients at batch 1 and 3, NHWC, float64
finite differences; shapes, parameters and MACs; errors at the argument."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opcases import Case, assert_error_at, layer_stats, opencl_f64_test, opencl_nhwc_test, opencl_suite, standard_suite


def reference(x, params, *, kind, groups=None, eps=1e-5, init=None, shared=False):
    w, b = params.get("weight"), params.get("bias")
    if kind == "layernorm":
        # Over the channels at each position: channels last, F.layer_norm over the last axis, back.
        moved = x.movedim(1, -1)
        return F.layer_norm(moved, (x.shape[1],), w, b, eps).movedim(-1, 1)
    if kind == "groupnorm":
        return F.group_norm(x, groups, w, b, eps)
    if kind == "instancenorm":
        return F.instance_norm(x, weight=w, bias=b, eps=eps)
    if kind == "prelu":
        return F.prelu(x, w)
    raise AssertionError(kind)


CASES = (
    Case("layernorm-vector", (10,), "layernorm", dict(kind="layernorm")),
    Case("layernorm-2d", (6, 4, 5), "layernorm", dict(kind="layernorm")),
    Case("layernorm-1d-eps", (3, 7), "layernorm(eps=0.01)", dict(kind="layernorm", eps=0.01)),
    Case("groupnorm-2d", (6, 4, 5), "groupnorm(3)", dict(kind="groupnorm", groups=3)),
    Case("groupnorm-one-group", (4, 3, 3), "groupnorm(1)", dict(kind="groupnorm", groups=1)),
    Case("groupnorm-3d", (4, 2, 3, 2), "groupnorm(groups=2, eps=0.001)", dict(kind="groupnorm", groups=2, eps=1e-3)),
    Case("groupnorm-vector", (8,), "groupnorm(2)", dict(kind="groupnorm", groups=2)),
    Case("instancenorm-2d", (3, 5, 4), "instancenorm", dict(kind="instancenorm")),
    Case("instancenorm-1d", (2, 9), "instancenorm(eps=0.1)", dict(kind="instancenorm", eps=0.1)),
    Case("prelu-2d", (4, 5, 3), "prelu", dict(kind="prelu")),
    Case("prelu-vector", (6,), "prelu(init=0.1)", dict(kind="prelu")),
    Case("prelu-shared-1d", (3, 8), "prelu(shared=true)", dict(kind="prelu")),
    Case("groupnorm-large", (8, 48, 40), "groupnorm(4)", dict(kind="groupnorm", groups=4)),
    Case("layernorm-large", (16, 40, 40), "layernorm", dict(kind="layernorm")),
    Case("prelu-large", (16, 40, 40), "prelu", dict(kind="prelu")),
    Case("layernorm-runtime", (4, 3, 5), "layernorm", dict(kind="layernorm"), dims=(4, "H", "W"), shape2=(4, 6, 2)),
    Case("groupnorm-runtime", (4, 3, 5), "groupnorm(2)", dict(kind="groupnorm", groups=2), dims=(4, "P", "Q"),
         shape2=(4, 2, 7)),
)

runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64 = \
    standard_suite(CASES, reference, seed=71)

# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite — each op on a vector
# and a map, groups of one and several channels, a shared slope and run-time sizes.
OPENCL_CASES = (
    'layernorm-2d', 'layernorm-1d-eps', 'groupnorm-2d', 'groupnorm-3d', 'groupnorm-vector', 'instancenorm-1d',
    'prelu-2d', 'prelu-vector', 'prelu-shared-1d', 'layernorm-runtime', 'groupnorm-runtime',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=75, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=1075, ids=OPENCL_CASES)
test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=2075, ids=(
    "layernorm-2d", "groupnorm-2d", "groupnorm-vector", "instancenorm-1d", "prelu-2d", "prelu-shared-1d"))


def test_parameters_start_as_pytorch_does():
    from opcases import compile_cases
    net = compile_cases(CASES).Model(seed=0)
    for i, case in enumerate(CASES):
        kind = case.ref["kind"]
        if kind == "prelu":
            init = 0.1 if "init=0.1" in case.op else 0.25
            n = 1 if "shared" in case.op else case.shape[0]
            assert net.params[f"L{i}.weight"].tolist() == pytest.approx([init] * n), case.id
        else:
            assert net.params[f"L{i}.weight"].tolist() == [1.0] * case.shape[0], case.id
            assert net.params[f"L{i}.bias"].tolist() == [0.0] * case.shape[0], case.id


def test_shapes_parameters_and_macs():
    stats = layer_stats("input x: [8, 6, 5]\n a = x -> layernorm\n b = x -> groupnorm(4)\n c = x -> instancenorm\n"
                        " d = x -> prelu\n e = x -> prelu(shared=true)\n output a, b, c, d, e")
    assert {k: v.params for k, v in stats.items()} == {"layernorm1": 16, "groupnorm1": 16, "instancenorm1": 16,
                                                       "prelu1": 8, "prelu2": 1}
    assert stats["groupnorm1"].macs == 3 * 8 * 6 * 5
    assert stats["prelu1"].macs == 8 * 6 * 5


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [6, 4, 4]\n y = x -> groupnorm(4)\n output y", "4)", ("groups=4 must divide the input channels",)),
    ("input x: [6, 4, 4]\n y = x -> groupnorm(0)\n output y", "0)", ("`groups` must be at least 1",)),
    ("input x: [6, 4, 4]\n y = x -> layernorm(eps=0)\n output y", "0)", ("`eps` must be greater than 0",)),
    ("input x: [6]\n y = x -> instancenorm\n output y", "instancenorm", ("one position per channel",)),
    ("input x: [6, 1, 1]\n y = x -> instancenorm\n output y", "instancenorm", ("one position per channel",)),
    ("input x: [6, 4]\n y = x -> prelu(init=he)\n output y", "he", ("`init` must be a number",)),
    ("input x: [6, 4]\n y = x -> prelu(shared=1)\n output y", "1)", ("`shared` must be true or false",)),
])
def test_errors_point_at_the_argument(body, needle, fragments):
    assert_error_at(body, needle, *fragments)
