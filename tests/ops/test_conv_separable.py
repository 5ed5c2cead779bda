"""conv's `separable` variant (§4.3.2): a frozen `const` kernel of rank 1 (Sobel, box, Gaussian,
any outer product of one vector per axis) as one 1-D pass per axis, against F.conv1d/2d/3d with
the full kernel: forward and dX for stride, every padding form, dilation, groups, flip, 1-D to
3-D, batch 1 and 3, both layouts, f32 and f64 (finite differences); and the plan's choice: the
split for rank-1 const kernels, never for a rank-2 one or for weights that train.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.compiler import graph_from_source
from convdsl.errors import ConvDSLError
from convdsl.lower import lower
from convdsl.targets.opencl import OpenCLTarget
from ccheck import assert_c_compiles_cleanly
from opcases import dsl, finite_differences, Case
from reference import assert_close, pad_pairs, pad_spatial

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
RNG = np.random.default_rng(201)


def literal(a: np.ndarray) -> str:
    """A nested list of a const's values, as the file writes it."""
    return repr(a.tolist())


def outer(*vectors) -> np.ndarray:
    out = np.asarray(vectors[0], dtype=np.float64)
    for v in vectors[1:]:
        out = np.multiply.outer(out, np.asarray(v, dtype=np.float64))
    return out


def rank1(out: int, cin: int, kernel: tuple[int, ...]) -> np.ndarray:
    """A weight [out, cin, *kernel] whose every pair is an outer product of random vectors (not
    symmetric, so that flip is seen), in steps of 1/8 so that the file's decimals are exact."""
    return np.stack([np.stack([outer(*(RNG.integers(-8, 9, k) / 8 for k in kernel)) for _ in range(cin)])
                     for _ in range(out)])


SOBEL_X = outer([1, 2, 1], [1, 0, -1])[None, None]
BOX = np.full((3, 2, 3, 2), 1 / 8)                   # 3 out, 2 in, a 3×2 box
GAUSS = outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1])[None, None] / 256
LAPLACE = np.array([[[[0, 1, 0], [1, -4, 1], [0, 1, 0]]]], dtype=np.float64)   # rank 2


class SepCase:
    """A conv layer with a frozen const weight; `ref` the F.conv arguments."""
    def __init__(self, id, shape, weight, *, algo="separable", dims=None, relu=False, **kw):
        self.id, self.shape, self.weight, self.kw, self.relu = id, shape, weight, kw, relu
        self.dims = dims if dims is not None else shape        # as declared: names for run-time sizes
        args = [str(weight.shape[0]), f"kernel={dsl(tuple(weight.shape[2:]))}", "frozen=true"]
        args += [f"{k}={dsl(v)}" for k, v in kw.items()] + ([f"algo={algo}"] if algo else [])
        # relu: applied by the split's forward as it writes (the epilogue)
        self.op = lambda name: f"conv({', '.join(args)}, weight={name})" + (" -> relu" if relu else "")


SPLIT_CASES = (
    SepCase("sobel-same-relu", (1, 8, 9), SOBEL_X, pad="same", relu=True),
    SepCase("box-stride-asymmetric", (2, 9, 8), BOX, stride=(2, 1), pad=((1, 2), (0, 1))),
    SepCase("gauss-5x5-dilated", (1, 13, 12), GAUSS, dilation=2, pad="same", bias=False),
    SepCase("rank1-flip-full", (2, 6, 7), rank1(2, 2, (3, 4)), flip=True, pad="full"),
    SepCase("rank1-groups-stride", (4, 7, 7), rank1(6, 2, (3, 3)), groups=2, stride=2, pad=1),
    SepCase("rank1-depthwise-flip", (3, 8, 6), rank1(3, 1, (5, 4)), groups=3, flip=True, pad=((0, 1), (2, 0))),
    SepCase("1d-stride-same-flip", (3, 12), rank1(2, 3, (4,)), stride=3, pad="same", flip=True),
    SepCase("3d-mixed", (2, 5, 6, 7), rank1(2, 2, (3, 2, 3)), stride=(2, 1, 2), dilation=(1, 2, 1),
            pad=((1, 0), (0, 1), (1, 1))),
    SepCase("3d-groups-flip", (2, 4, 5, 4), rank1(4, 1, (2, 3, 2)), groups=2, flip=True, pad=1, bias=False),
    # a 1-tap axis: strided (its pass runs), and at stride 1 without padding (its factor folds
    # into the other axis's and it has no pass)
    SepCase("column-strided-across", (2, 7, 9), rank1(2, 2, (3, 1)), stride=(1, 2), pad=(1, 0)),
    SepCase("row-kernel", (2, 6, 9), rank1(3, 2, (1, 3)), pad=((0, 0), (1, 1))),
    # run-time sizes: the padding of `same` at stride 2 is known at run time only
    SepCase("runtime-gauss-same-stride", (1, 11, 9), GAUSS, stride=2, pad="same", dims=(1, "H", "W")),
    # a 1×1 kernel is rank 1 too
    SepCase("pointwise", (3, 4, 5), rank1(2, 3, (1, 1))),
)
IDS = [c.id for c in SPLIT_CASES]


def source(cases, dtype="f32", layout="NCHW") -> str:
    lines = ["network S {", f"    dtype {dtype}", f"    layout {layout}"]
    for i, c in enumerate(cases):
        shape = c.dims if layout == "NCHW" or len(c.dims) == 1 else (*c.dims[1:], c.dims[0])
        lines.append(f"    input x{i}: [{', '.join(map(str, shape))}]")
        lines.append(f"    const w{i} = {literal(c.weight)}")
        lines.append(f"    y{i} = x{i} -> {c.op(f'w{i}')}")
    lines.append("    output " + ", ".join(f"y{i}" for i in range(len(cases))))
    lines.append("}")
    return "\n".join(lines) + "\n"


def reference(x, c, bias):
    rank = x.dim() - 2
    kw = c.kw
    kernel = tuple(c.weight.shape[2:])
    pairs = pad_pairs(kw.get("pad", "valid"), tuple(x.shape[2:]), kernel, kw.get("stride", 1), kw.get("dilation", 1))
    w = torch.tensor(c.weight, dtype=torch.float64)
    if kw.get("flip"):
        w = torch.flip(w, dims=tuple(range(2, w.dim())))
    y = CONV[rank](pad_spatial(x, pairs), w, bias, stride=kw.get("stride", 1), dilation=kw.get("dilation", 1),
                   groups=kw.get("groups", 1))
    return F.relu(y) if c.relu else y


def variants(src: str) -> list[str]:
    return [s.variant for s in lower(graph_from_source(src)).forward if s.op in ("conv", "depthwise")]


def plan_of(consts: dict, layers: str) -> list[str]:
    """The variants the plan picks for each conv of a network of one input of 3 × 96 × 96."""
    decls = "".join(f" const {name} = {literal(value)}\n" for name, value in consts.items())
    return variants(f"network P {{\n input x: [3, 96, 96]\n{decls}{layers} output " +
                    ", ".join(line.split("=")[0].strip() for line in layers.strip().splitlines()) + "\n}\n")


def test_the_plan_splits_rank1_const_kernels_only():
    """By the cost model (ops/conv.py, SEPARABLE_PASS_WEIGHT, from timings): the split for
    Gaussian and box filters of 5 taps a side and more, and for Sobel's pair of gradients on all
    three input channels; the direct loop keeps a 3×3 filter of one input channel."""
    sobel_xy = np.stack([np.stack([SOBEL_X[0, 0]] * 3), np.stack([SOBEL_X[0, 0].T] * 3)])   # [2, 3, 3, 3]
    box5 = np.full((3, 1, 5, 5), 1 / 25)
    gauss7 = np.repeat(outer(*[[1, 6, 15, 20, 15, 6, 1]] * 2)[None, None] / 4096, 3, axis=0)
    layers = (" a = x -> conv(2, kernel=3, weight=sobel, frozen=true, pad=same)\n"
              " b = x -> depthwise(5, weight=box, frozen=true, pad=same)\n"
              " c = x -> depthwise(7, weight=gauss, frozen=true, pad=same, bias=false)\n")
    assert plan_of({"sobel": sobel_xy, "box": box5, "gauss": gauss7}, layers) == ["separable"] * 3
    one = " a = x -> depthwise(3, weight=sobel1, frozen=true, pad=same)\n"
    assert plan_of({"sobel1": np.repeat(SOBEL_X, 3, axis=0)}, one) == ["direct"]
    # OpenCL has no kernels for the split: the same Sobel layers get its own variants there
    sobel = lower(graph_from_source(f"network O {{\n input x: [3, 96, 96]\n const sobel = {literal(sobel_xy)}\n"
                                    + layers.splitlines()[0] + "\n output a\n}\n"),
                  backend="opencl", lacks=OpenCLTarget.lacks_variants)
    assert [s.variant for s in sobel.forward if s.op == "conv"] == ["im2col"]
    # the relu after the split runs in its forward (the epilogue)
    first = lower(graph_from_source(source(SPLIT_CASES[:1]))).forward
    assert [s.op for s in first] == ["conv"] and [g.op for g in first[0].epilogue.stages] == ["relu"]


def test_algo_separable_applies_to_rank1_frozen_consts_only():
    """The split needs the values at compile time and a kernel of rank 1 to within 10⁻⁷ of its
    largest tap: a Laplacian (rank 2), a Sobel kernel that trains (no frozen=true), a frozen
    kernel without `weight=` (drawn at create) and a Sobel kernel off by 10⁻⁵ are refused at
    `algo=`; the Sobel kernel itself is accepted."""
    nearly = SOBEL_X.copy()
    nearly[0, 0, 1, 1] = 1e-5

    def layer(weight, args):
        const = f" const k = {literal(weight)}\n" if weight is not None else ""
        return graph_from_source(f"network R {{\n input x: [1, 8, 8]\n{const}"
                                 f" y = x -> conv(1, kernel=3, {args}, algo=separable)\n output y\n}}\n")

    layer(SOBEL_X, "weight=k, frozen=true")
    for weight, args in ((LAPLACE, "weight=k, frozen=true"), (SOBEL_X, "weight=k"), (None, "frozen=true"),
                         (nearly, "weight=k, frozen=true")):
        with pytest.raises(ConvDSLError, match="algo=separable does not apply"):
            layer(weight, args)


@pytest.fixture(scope="module")
def modules():
    return {layout: convdsl.load_source(source(SPLIT_CASES, layout=layout)) for layout in ("NCHW", "NHWC")}


@pytest.mark.parametrize("layout", ("NCHW", "NHWC"))
@pytest.mark.parametrize("batch", (1, 3))
def test_forward_and_input_gradient_match_torch(modules, layout, batch):
    net = modules[layout].Model(seed=0)
    rng = np.random.default_rng(202 + batch)
    for name, p in net.params.items():
        if name.endswith("bias"):
            p[...] = rng.standard_normal(p.shape)        # frozen too, but not part of the split
    assert list(net.grads) == []
    last = (lambda a: np.moveaxis(a, 1, -1)) if layout == "NHWC" else (lambda a: a)
    first = (lambda a: np.moveaxis(a, -1, 1)) if layout == "NHWC" else (lambda a: a)
    xs = [rng.standard_normal((batch, *c.shape)).astype(np.float32) for c in SPLIT_CASES]
    ys = [first(y) for y in net.forward(*[last(x) for x in xs])]
    dys = [rng.standard_normal(y.shape).astype(np.float32) for y in ys]
    dxs = [first(d) for d in net.backward(*[last(d) for d in dys])]
    for i, c in enumerate(SPLIT_CASES):
        x = torch.tensor(xs[i], dtype=torch.float64, requires_grad=True)
        bias = net.params.get(f"conv{i + 1}.bias")
        y = reference(x, c, None if bias is None else torch.tensor(bias, dtype=torch.float64))
        assert_close(ys[i], y.detach().numpy(), what=f"{c.id}: forward")
        y.backward(torch.tensor(dys[i], dtype=torch.float64))
        assert_close(dxs[i], x.grad.numpy(), what=f"{c.id}: input gradient")


def test_finite_differences_float64():
    module = convdsl.load_source(source(SPLIT_CASES, dtype="f64"))
    cases = [Case(c.id, c.shape, "") for c in SPLIT_CASES]
    finite_differences(module, cases, np.random.default_rng(205), net=module.Model(seed=0))


def test_generated_c_has_no_warnings(tmp_path):
    assert_c_compiles_cleanly(source(SPLIT_CASES, dtype="f64"), tmp_path)


def test_weights_written_into_params_are_used():
    """The factors hold for the const only: weights written into Model.params (here a rank-2
    kernel, then the const again) give the result of those weights, forward and dX."""
    c = SPLIT_CASES[IDS.index("rank1-groups-stride")]
    net = convdsl.load_source(source([c])).Model(seed=0)
    rng = np.random.default_rng(206)
    x = rng.standard_normal((2, *c.shape)).astype(np.float32)
    dy = None
    const = net.params["conv1.weight"].copy()
    for what, weight in (("a written rank-2 kernel", rng.standard_normal(const.shape)), ("the const again", const)):
        net.params["conv1.weight"][...] = weight
        y = net.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32) if dy is None else dy
        dx = net.backward(dy)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        w = torch.tensor(net.params["conv1.weight"], dtype=torch.float64)
        ref = F.conv2d(F.pad(xt, (1, 1, 1, 1)), w, torch.tensor(net.params["conv1.bias"], dtype=torch.float64),
                       stride=2, groups=2)
        ref.backward(torch.tensor(dy, dtype=torch.float64))
        assert_close(y, ref.detach().numpy(), what=f"{what}: forward")
        assert_close(dx, xt.grad.numpy(), what=f"{what}: input gradient")
