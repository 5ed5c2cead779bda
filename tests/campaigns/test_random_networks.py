"""Random networks against PyTorch: every op and option of the language, compiled and compared
with a float64 PyTorch reference built from the same random choices (see netgen.py, netlang.py,
netcheck.py and docs/testing.md).

Seeds 0-49 are the quick slice, 50-199 are marked slow; the files in regressions/ are failures a
campaign found, shrunk, and are replayed here. A bigger campaign:
`OMP_NUM_THREADS=1 python -m tests.campaigns.random_nets --count 10000 --seed S`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import convdsl
from backends import requires_opencl
from netcheck import CampaignFailure, compare, run_case
from netgen import features, generate
from netlang import DropoutKeys, dumps, loads, render, splitmix_outputs
from random_nets import read_regression

QUICK, TOTAL = 50, 200     # 200 networks in CI (issue 7); the 200 use every feature of ALL_MUST_COVER
BUDGET = 10          # layers per network after unrolling: small networks compile fast

# f32 networks build at -O1, not the suite's -O0: -O1 contracts multiply-adds into FMAs as -O3 and
# PyTorch's kernels do (convdsl/runtime/build.py, LEVEL_EXTRAS), and f32 results are compared with
# PyTorch's own f32 error (netcheck); without FMAs an ill-conditioned f32 gradient (seed 58 of the
# slow slice: a training-mode batchnorm after tanh at batch 1) came out 29 times PyTorch's error
# instead of under 10. f64 networks stay at -O0 (2.5 times faster to compile): their tolerance,
# rtol 1e-7, is far above anything FMAs change in float64.


@pytest.fixture
def at_its_level(monkeypatch):
    """`at_its_level(case)` sets the level the case's network builds at, and returns the case."""
    def set_level(case):
        monkeypatch.setenv("CONVDSL_OPT", "-O1" if case.program.dtype == "f32" else "-O0")
        return case
    return set_level


REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.cnn"))


@pytest.mark.parametrize("seed", range(QUICK))
def test_random_network(seed, at_its_level):
    run_case(at_its_level(generate(seed, BUDGET)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(QUICK, TOTAL))
def test_random_network_more(seed, at_its_level):
    run_case(at_its_level(generate(seed, BUDGET)))


# On the OpenCL backend: every tenth network of the quick slice (each is an OpenCL program of its
# own, which PoCL compiles kernel by kernel the first time, ~4 s of CPU), against the same reference.
OPENCL_SEEDS = range(0, QUICK, 10)


@requires_opencl
@pytest.mark.parametrize("seed", OPENCL_SEEDS)
def test_random_network_on_opencl(seed, at_its_level):
    case = at_its_level(generate(seed, BUDGET))
    run_case(case, convdsl.load_source(render(case.program), backend="opencl"))


# Networks whose 2-D 3×3 stride-1 convs (and depthwise ones) run as a forced Winograd variant
# (CONVDSL_ALGO), as users force one: f64 NHWC depthwise (seed 21), f32 depthwise (15), f32 NHWC
# convs (38), f32 NCHW convs (48). (Seeds from a search of the quick range; the generator's draws
# change when it learns new ops.)
WINOGRAD_SEEDS = [(21, "winograd4"), (15, "winograd4"), (38, "winograd2")]
WINOGRAD_MORE = [(21, "winograd2"), (15, "winograd2"), (38, "winograd4"), (48, "winograd4"), (30, "winograd2"),
                 (48, "winograd2")]
# And with every conv and depthwise layer forced to `narrow` (lib/gemm's cdsl_gemm_narrow, which
# the plan picks on small maps only): f32 NHWC convs (seed 38), f64 NHWC depthwise (21).
NARROW_SEEDS = [(38, "narrow"), (21, "narrow")]
NARROW_MORE = [(15, "narrow"), (48, "narrow"), (4, "narrow")]


def run_forcing(monkeypatch, at_its_level, seed: int, variant: str) -> None:
    from convdsl.compiler import graph_from_source
    from convdsl.lower import lower
    case = at_its_level(generate(seed, BUDGET))
    monkeypatch.setenv("CONVDSL_ALGO", f"conv={variant},depthwise={variant}")
    assert variant in {s.variant for s in lower(graph_from_source(render(case.program))).forward}, \
        f"seed {seed} has no layer {variant} applies to"
    run_case(case)


@pytest.mark.parametrize("seed, variant", WINOGRAD_SEEDS + NARROW_SEEDS)
def test_random_network_forcing_a_variant(monkeypatch, at_its_level, seed, variant):
    run_forcing(monkeypatch, at_its_level, seed, variant)


@pytest.mark.slow
@pytest.mark.parametrize("seed, variant", WINOGRAD_MORE + NARROW_MORE)
def test_random_network_forcing_a_variant_more(monkeypatch, at_its_level, seed, variant):
    run_forcing(monkeypatch, at_its_level, seed, variant)


# Networks with layers forced to the FFT variant (stride-1 convs and depthwise ones with sizes
# known at check time): f64 (seed 4: three such layers), f32 (34: three; 22: two); more in the
# slow set. (Seeds from a search of the quick range, as above.)
FFT_SEEDS = [4, 34, 22]
FFT_MORE = [3, 8, 28, 30, 48]


@pytest.mark.parametrize("seed", FFT_SEEDS)
def test_random_network_forcing_fft(monkeypatch, at_its_level, seed):
    run_forcing(monkeypatch, at_its_level, seed, "fft")


@pytest.mark.slow
@pytest.mark.parametrize("seed", FFT_MORE)
def test_random_network_forcing_fft_more(monkeypatch, at_its_level, seed):
    run_forcing(monkeypatch, at_its_level, seed, "fft")


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.stem)
def test_regression(path, at_its_level):
    case, text = read_regression(path)
    at_its_level(case)
    assert render(case.program) == text, "the .cnn text is not the one its case writes"
    run_case(case)


# ---- the campaign's own machinery: cheap checks that it tests what it claims --------------

QUICK_MUST_COVER = {
    *(f"op:{op}" for op in ("conv", "depthwise", "separable", "local", "tiled", "deconv", "maxpool", "avgpool",
                            "l2pool", "globalavgpool", "globalmaxpool", "maxout", "shuffle", "upsample", "flatten",
                            "dense", "relu", "sigmoid", "tanh", "leaky_relu", "softmax", "add", "concat", "scale",
                            "batchnorm", "dropout", "relu6", "clip", "hardsigmoid", "hardswish", "silu", "gelu",
                            "elu", "prelu", "layernorm", "groupnorm", "instancenorm", "sub", "mul", "pad",
                            "reshape")),
    "pad_mode:reflect", "pad_mode:replicate", "reshape:to-rank-0", "reshape:to-rank-1", "reshape:to-rank-2",
    "rank:0", "rank:1", "rank:2", "rank:3", "layout:NCHW", "layout:NHWC", "dtype:f32", "dtype:f64",
    "mode:train", "mode:eval", "run-time sizes", "inputs:several", "outputs:several", "outputs:also-read", "size:large",
    "pad:valid", "pad:same", "pad:full", "pad:int", "pad:tuple", "pad:pairs-asymmetric", "pad:pairs-end-only",
    "conv:stride", "conv:dilation", "conv:groups", "flip=true", "frozen=true", "bias=false", "weight=const",
    "layer", "layer:applied", "repeat", "block", "block:applied", "block:default-argument", "block-arg:ParamRef",
    "block-arg:Measure", "loss:mse", "loss:softmax_cross_entropy", "loss:softmax_cross_entropy:weight",
    "loss:softmax_cross_entropy:ignore_index", "loss:sigmoid_cross_entropy", "loss:dice", "loss:dice:activation",
    "loss:dice:eps", "loss:l1", "loss:smooth_l1", "loss:smooth_l1:beta", "dropout:p>0", "algo:im2col",
    "init:xavier", "init:zeros", "init:ones", "init:normal", "init:uniform", "deconv:output_pad", "tiled:tile",
    "upsample:bilinear", "depthwise:multiplier", "style:pipe", "style:call", "args:positional-and-keyword",
}
ALL_MUST_COVER = QUICK_MUST_COVER | {"upsample:linear", "upsample:trilinear", "upsample:nearest", "pad:pairs",
                                     "block-arg:Arith", "block:nested", "deconv:groups", "deconv:stride",
                                     "depthwise:dilation", "separable:stride", "local:stride", "l2pool:stride",
                                     "reshape:inferred", "reshape:to-rank-3", "prelu:init", "pad_mode:zeros"}


def covered(seeds) -> set:
    out = set()
    for seed in seeds:
        out |= features(generate(seed, BUDGET))
    return out


def test_quick_slice_covers_the_language():
    missing = QUICK_MUST_COVER - covered(range(QUICK))
    assert not missing, f"no network of the quick slice uses {sorted(missing)}"


@pytest.mark.slow
def test_all_seeds_cover_the_language():
    missing = ALL_MUST_COVER - covered(range(TOTAL))
    assert not missing, f"no network of the CI seeds uses {sorted(missing)}"


def test_generation_is_reproducible_and_round_trips():
    for seed in (0, 7, 31):
        a, b = generate(seed, BUDGET), generate(seed, BUDGET)
        assert render(a.program) == render(b.program)
        assert loads(dumps(a)) == a


def test_splitmix_reference_matches_the_published_sequence():
    # SplitMix64 from state 0 (Steele, Lea, Flood 2014; the reference C of xoshiro's authors).
    assert splitmix_outputs(0, 3) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    keys = DropoutKeys(5)
    first = keys.next_key()
    assert first == splitmix_outputs(5 ^ 0xA0761D6478BD642F, 1)[0] and keys.next_key() != first


def test_compare_refuses_a_difference_beyond_the_tolerance():
    tol = dict(rtol=1e-4, atol=1e-5)
    compare("forward", [1.0, 2.0], [1.0, 2.0 + 1e-6], tol, "close")
    with pytest.raises(CampaignFailure):
        compare("forward", [1.0, 2.0], [1.0, 2.001], tol, "far")
    with pytest.raises(CampaignFailure):
        compare("forward", [float("nan")], [0.0], tol, "nan")
