"""Every resource limit the compiler enforces, in one place, with the reason for each number.

A limit is checked once, where the thing it limits is made (a literal, an op, a `repeat` round,
a block call, a `use`), and refused with a ConvDSLError at the span of the text that made it, so
that no input can make the compiler hang, exhaust memory, or hand the C compiler a number that
wraps. docs/language.md ("Limits") lists them for users.
"""
from __future__ import annotations

# ---- sizes --------------------------------------------------------------------------------------

# The largest batch and the largest value of a run-time size (a named input dim) that a generated
# module accepts; `prepare` refuses anything larger. Must equal CDSL_MAX_SIZE in
# templates/c/module.c.j2 (tests/ir/test_limits.py checks that it does).
MAX_RUNTIME_SIZE = 2 ** 24

# The generated C computes every size (a dim, a tensor's element count, a padding, a workspace)
# in int64, from the run-time sizes. The rule that keeps those computations from wrapping, proved
# in convdsl/ir/dims.py (magnitude_bound): with every run-time size at MAX_RUNTIME_SIZE, the bound
# of every size expression and the product of the bounds of every tensor's dims stay below
# SIZE_BOUND, which leaves int64 (< 2**63) room to spare.
SIZE_BOUND = 2 ** 62

# An integer attribute that becomes a size or a loop bound in C: kernel, stride, pad, dilation,
# output_pad, upsample factor, tile, channels (`out`), groups, multiplier, maxout's k. No network
# needs one larger than the largest run-time size, and with this cap the product of any two is
# far below SIZE_BOUND.
MAX_ATTRIBUTE = 2 ** 24

# Elements per sample of every tensor of fixed size in a network, summed (inputs, every layer's
# output, what a forward saves for backward), and of one layer's workspace. 2**34 f32 values are
# 64 GiB per sample, twice that with gradients: more than a module's default memory limit
# (256 GiB, CDSL_MAX_BYTES) lets a single sample use.
MAX_ACTIVATION_ELEMENTS = 2 ** 34

# Parameters (weights and biases), in elements: of one layer and of the whole network. 2**31 f32
# values are 8 GiB of weights, and as much again for their gradients.
MAX_LAYER_PARAMS = 2 ** 31
MAX_PARAMS = 2 ** 31

# ---- values -------------------------------------------------------------------------------------

# Every integer the compiler computes with (literals, arithmetic, block arguments) stays within
# ±MAX_INT, so that `c = c * c` in a `repeat` stops at once instead of growing without bound.
MAX_INT = 2 ** 62

# A float attribute or const value becomes a literal of the network's element type in C; it must
# be finite there (1e300 is inf in f32).
FLOAT_MAX = {"f32": 3.4028234663852886e38, "f64": 1.7976931348623157e308}

# normal(std) and uniform(a) draw weights of at most about 9·std (the generator's farthest tail):
# this bound keeps every weight finite in f32.
MAX_INIT_SCALE = 1e30

# A name (network, block, layer, value, parameter) becomes part of a file name, a Python module
# name and C identifiers; longer names are refused at the name.
MAX_NAME_LENGTH = 128

# A run-time size expression (`(H + 1)//2`) is rebuilt at every layer and rendered to C; these
# bound its number of pieces and how deeply they nest, so that its arithmetic stays cheap.
MAX_EXPRESSION_TERMS = 1000
MAX_EXPRESSION_DEPTH = 64

# ---- compile work -------------------------------------------------------------------------------

# Truly nested expressions (`f(g(h(x)))`, `[[[1]]]`, `-(-(-1))`) are walked recursively, so the
# parser refuses a statement nested deeper than this, and the IR builder does the same for nesting
# that adds up across blocks applied inside blocks (a block's body runs inside the call that
# applies it). A level takes up to seven Python frames, so 100 levels stay well inside Python's
# default recursion limit of 1000. A chain of ops written with `->` is not nesting: every stage
# walks it link by link, and it may be as long as the layer limit allows.
MAX_NESTING = 100

MAX_REPEAT = 1000               # rounds of one `repeat`
MAX_NODES = 100_000             # layers of one network, after repeats and blocks are unrolled
MAX_STATEMENTS = 1_000_000      # statements run while building one network, repeat rounds included
MAX_BLOCK_CALLS = 100_000       # block applications while building one network
MAX_CONST_ELEMENTS = 2 ** 20    # numbers in one `const` (each becomes a literal in the C source)
MAX_FILES = 1000                # files one program brings in with `use`, each read once
MAX_USE_DEPTH = 64              # files using files using files …


def power_text(value: int) -> str:
    """A limit as users read it: 2**24 = 16,777,216."""
    if value > 0 and value & (value - 1) == 0 and value >= 1024:
        return f"2**{value.bit_length() - 1} = {value:,}"
    return f"{value:,}"
