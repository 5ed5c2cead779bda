"""What the errors say to a new user: suggestions for unknown ops and losses, the implicit batch,
argument forms, notes for errors inside blocks, and several errors reported at once."""
from __future__ import annotations

import pytest

from convdsl import ConvDSLError
from convdsl.compiler import graph_from_source
from convdsl.errors import ConvDSLErrors, Note, edit_distance, is_misspelling
from convdsl.ir.build import MAX_ERRORS
from convdsl.passes.lints import lint


def error_of(text: str) -> ConvDSLError:
    with pytest.raises(ConvDSLError) as info:
        graph_from_source(text, "t.cnn")
    return info.value


def message(body: str, header: str = "") -> str:
    return error_of(f"{header}\nnetwork T {{\n{body}\n}}\n").message


def op_message(op: str) -> str:
    return message(f"input x: [3, 16, 16]\n y = x -> {op}\n output y")


# ---- unknown ops --------------------------------------------------------------------------------

@pytest.mark.parametrize("written, ours", [
    ("linear(10)", "dense"), ("Linear(10)", "dense"), ("Dense(10)", "dense"), ("fc(10)", "dense"),
    ("Conv2d(8, kernel=3)", "conv"), ("Conv1d(8, kernel=3)", "conv"), ("Conv3d(8, kernel=3)", "conv"),
    ("Conv2D(8, kernel=3)", "conv"), ("BatchNorm2d", "batchnorm"), ("BatchNormalization", "batchnorm"),
    ("ReLU", "relu"), ("MaxPool2d(2)", "maxpool"), ("MaxPooling2D(2)", "maxpool"), ("AvgPool2d(2)", "avgpool"),
    ("AdaptiveAvgPool2d", "globalavgpool"), ("GlobalAveragePooling2D", "globalavgpool"),
    ("Dropout(0.5)", "dropout"), ("ConvTranspose2d(8, kernel=2)", "deconv"), ("Conv2DTranspose(8, kernel=2)", "deconv"),
    ("Flatten", "flatten"), ("Softmax", "softmax"), ("LeakyReLU", "leaky_relu"), ("Sigmoid", "sigmoid"),
    ("Tanh", "tanh"), ("Upsample(2)", "upsample"), ("UpSampling2D(2)", "upsample"),
    ("DepthwiseConv2D(3)", "depthwise"), ("SeparableConv2D(8, kernel=3)", "separable"),
    ("concatenate(x)", "concat"), ("cat(x)", "concat"), ("Concatenate(x)", "concat"),
    ("swish", "silu"), ("Hardtanh(-1, 1)", "clip"), ("Hardswish", "hardswish"), ("LayerNorm", "layernorm"),
    ("GroupNorm(2)", "groupnorm"), ("InstanceNorm2d", "instancenorm"), ("PReLU", "prelu"), ("ReLU6", "relu6"),
    ("GELU", "gelu"), ("ReflectionPad2d(1)", "pad"), ("view((4, 4))", "reshape"), ("multiply(x, x)", "mul"),
    ("subtract(x, x)", "sub"), ("SiLU", "silu"), ("ELU", "elu"),
])
def test_other_libraries_names_are_answered_with_ours(written, ours):
    name = written.split("(")[0]
    assert op_message(written) == f"unknown op `{name}`; did you mean `{ours}`?"


@pytest.mark.parametrize("written, closest", [
    ("mish", "relu"), ("SELU", "relu"), ("Softplus", "relu"), ("RReLU", "leaky_relu"),
    ("LocalResponseNorm", "batchnorm"),
])
def test_an_op_the_language_lacks_is_said_to_be_missing(written, closest):
    assert op_message(written) == f"unknown op `{written}`: it is not in the language yet; `{closest}` is the closest"


def test_nothing_close_says_nothing_and_builtins_are_not_ops():
    assert op_message("frobnicate") == "unknown op `frobnicate`"
    # `swish` once drew "did you mean `width`?": a built-in is no op to put in a chain.
    assert op_message("widht") == "unknown op `widht`"
    assert message("input x: [3, 16, 16]\n c = chanels(x)\n y = x -> conv(c, kernel=1)\n output y") == \
        "unknown op `chanels`; did you mean `channels`?"


def test_misspellings_of_ops_blocks_layers_and_aliases():
    assert op_message("maxpol(2)") == "unknown op `maxpol`; did you mean `maxpool`?"
    assert op_message("lenear(4)") == "unknown op `lenear`; did you mean `dense`?"
    block = "block stage(x) {\n return x -> relu\n}"
    assert message("input x: [3, 16, 16]\n y = x -> stagee\n output y", block) == \
        "unknown op `stagee`; did you mean `stage`?"
    assert message("input x: [3, 16, 16]\n layer Up = conv(3, kernel=1)\n y = x -> Upp\n output y") == \
        "unknown op `Upp`; did you mean `Up`?"


def test_keyword_names_of_other_libraries():
    assert op_message("conv(8, kernel_size=3)") == "conv has no argument `kernel_size`; did you mean `kernel`?"
    assert op_message("maxpool(kernel_size=2)") == "maxpool has no argument `kernel_size`; did you mean `window`?"
    assert op_message("conv(8, kernel=3, padding=1)") == "conv has no argument `padding`; did you mean `pad`?"
    assert op_message("conv(filters=8, kernel=3)") == "conv has no argument `filters`; did you mean `out`?"


def test_close_means_a_slip_per_four_letters():
    assert edit_distance("reul", "relu") == 1 and edit_distance("maxpol", "maxpool") == 1
    assert is_misspelling("maxpol", "maxpool") and is_misspelling("mes", "mse")
    assert not is_misspelling("swish", "width")
    assert not is_misspelling("binary_cross_entropy", "softmax_cross_entropy")


# ---- losses -------------------------------------------------------------------------------------

def loss_message(loss: str) -> str:
    return message(f"input x: [10]\n y = x -> dense(4)\n output y\n loss {loss}(y)")


KNOWN_LOSSES = "(known: softmax_cross_entropy, sigmoid_cross_entropy, dice, mse, l1, smooth_l1)"


def test_a_different_loss_is_not_suggested():
    assert loss_message("hinge") == f"unknown loss `hinge`: it is not in the language {KNOWN_LOSSES}"
    assert loss_message("nll") == f"unknown loss `nll`: it is not in the language {KNOWN_LOSSES}"
    assert loss_message("hinge_of_doom") == f"unknown loss `hinge_of_doom` {KNOWN_LOSSES}"
    assert loss_message("softmax") == f"`softmax` is an op, not a loss {KNOWN_LOSSES}"


def test_a_loss_close_to_ours_says_how_it_differs():
    # binary_cross_entropy takes probabilities, ours takes the scores: not the same loss.
    for name in ("binary_cross_entropy", "BCELoss", "binary_crossentropy"):
        assert loss_message(name) == (
            f"unknown loss `{name}`: it takes probabilities; `sigmoid_cross_entropy` takes the scores before the "
            f"sigmoid and applies it itself (PyTorch's binary_cross_entropy_with_logits)")
    assert loss_message("HuberLoss") == ("unknown loss `HuberLoss`: `smooth_l1(y, beta=δ)` is PyTorch's "
                                         "HuberLoss(delta=δ) divided by δ")
    assert loss_message("l2") == "unknown loss `l2`: `mse` is the mean of the squared differences"


def test_the_same_loss_under_another_name_or_misspelt_is_suggested():
    assert loss_message("CrossEntropyLoss") == "unknown loss `CrossEntropyLoss`; did you mean `softmax_cross_entropy`?"
    assert loss_message("MSELoss") == "unknown loss `MSELoss`; did you mean `mse`?"
    assert loss_message("softmax_crossentropy") == \
        "unknown loss `softmax_crossentropy`; did you mean `softmax_cross_entropy`?"
    assert op_message("CrossEntropyLoss") == \
        "`CrossEntropyLoss` is a loss; write it in a `loss` statement: `loss softmax_cross_entropy(…)`"
    for name, ours in (("BCEWithLogitsLoss", "sigmoid_cross_entropy"), ("binary_cross_entropy_with_logits",
                                                                       "sigmoid_cross_entropy"),
                       ("L1Loss", "l1"), ("mae", "l1"), ("SmoothL1Loss", "smooth_l1"), ("DiceLoss", "dice"),
                       ("dcie", "dice")):
        assert loss_message(name) == f"unknown loss `{name}`; did you mean `{ours}`?"


# ---- the implicit batch -------------------------------------------------------------------------

@pytest.mark.parametrize("dims", ["[N, 3, 32, 32]", "[B, 3, 32, 32]", "[batch, 3, 32, 32]", "[n, 3, H, W]",
                                  "[batch_size, 16]"])
def test_a_batch_dim_is_refused_at_the_input(dims):
    e = error_of(f"network T {{\n input x: {dims}\n y = x -> relu\n output y\n}}\n")
    first = dims[1:].split(",")[0]
    rest = "[" + dims.split(",", 1)[1].strip()
    assert e.message.startswith(f"`{first}` looks like the batch size, but the batch is implicit")
    assert e.message.endswith(f"write `input x: {rest}`")
    assert (e.span.line, e.span.col) == (2, 12)


def test_run_time_sizes_that_are_not_a_batch_still_build():
    for text in ("input x: [C, 8, 8]\n y = x -> relu", "input x: [3, N, N]\n y = x -> relu",
                 "layout NHWC\n input x: [N, 16]\n y = x -> relu"):
        graph_from_source(f"network T {{\n{text}\n output y\n}}\n")
    e = error_of("network T {\nlayout NHWC\n input x: [N, 28, 28, 1]\n y = x -> relu\n output y\n}\n")
    assert e.message.endswith("write `input x: [28, 28, 1]`")


def test_a_named_first_dim_before_fixed_ones_gets_a_note_where_it_fails():
    e = error_of("network T {\n input x: [S, 3, 32, 32]\n y = x -> conv(8, kernel=3)\n output y\n}\n")
    assert e.message == "conv needs a fixed channel count; the input is [S, 3, 32, 32]"
    (note,) = e.notes
    assert (note.span.line, note.span.col) == (2, 8)
    assert "if `S` is the batch, leave it out (the batch is implicit): `input x: [3, 32, 32]`" in str(note)
    # [C, H, W] channels that vary are meant: no note.
    e = error_of("network T {\n input x: [C, H, W]\n y = x -> conv(8, kernel=3)\n output y\n}\n")
    assert e.notes == ()


# ---- argument values ----------------------------------------------------------------------------

def test_padding_forms_and_modes_the_language_lacks():
    for mode in ("reflect", "replicate"):
        assert op_message(f"conv(8, kernel=3, pad={mode})") == (
            f"`pad` says how much padding; {mode} is how it is filled: write `pad=1, pad_mode={mode}` (conv, "
            f"depthwise and separable take pad_mode), or pad the map first with `pad(1, mode={mode})`")
    text = op_message("conv(8, kernel=3, pad=circular)")
    assert text.startswith("undefined name `circular`: circular and symmetric padding are not in the language "
                           "(padding adds zeros, or with pad_mode=reflect or replicate mirrors or repeats the border); "
                           "`pad` is valid, same or full, an integer")
    assert "((1, 0), (2, 1))" in text
    assert op_message("maxpool(2, pad=wide)").startswith("undefined name `wide`: `pad` is valid, same or full")
    assert op_message('conv(8, kernel=3, pad="circular")').startswith(
        'a string is only allowed in `use "file.cnn"`, and circular and symmetric padding are not')
    assert op_message('conv(8, kernel=3, pad="same")') == \
        'a string is only allowed in `use "file.cnn"`; write `same` without quotes'
    assert op_message("conv(8, kernel=3, pad=he)").startswith("`pad` is valid, same or full")


def test_one_before_after_pair_on_a_1d_map():
    text = "network T {{\n input x: [4, 20]\n y = x -> conv(4, kernel=5, pad={pad})\n output y\n}}\n"
    assert "a single (before, after) pair is written `((4, 0),)`" in error_of(text.format(pad="((4, 0))")).message
    g = graph_from_source(text.format(pad="((4, 0),)"))
    assert g.nodes[0].attrs["pads"] == ((4, 0),)
    assert g.values[g.nodes[0].output].type.shape == (4, 20)


def test_a_list_argument_is_answered_with_the_tuple():
    assert op_message("conv(8, kernel=[3, 3])").endswith("for one value per axis write a tuple: `(3, 3)`")
    assert op_message("conv(8, kernel=3, pad=[[1, 0], [0, 1]])").endswith("`((1, 0), (0, 1))`")
    assert op_message("conv(8, kernel=3, pad=[[1, 0]])").endswith("`((1, 0),)`")


# ---- errors inside blocks ------------------------------------------------------------------------

NESTED = """block unit(x, c) {
    return x -> conv(c, kernel=3, pad=same) -> add(x)
}
block stage(x, c) {
    y = x -> unit(channels(x))
    return y -> unit(c)
}
network T {
    input x: [4, 8, 8]
    y = x -> stage(4) -> stage(8)
    output y
}
"""


def test_an_error_in_a_block_names_each_call_innermost_first():
    e = error_of(NESTED)
    assert (e.span.line, e.span.col) == (2, 48)
    assert [str(n) for n in e.notes] == ["note: in block `unit` called at t.cnn:6:17",
                                         "note: in block `stage` called at t.cnn:10:26"]
    assert all(isinstance(n, Note) for n in e.notes)
    assert [(n.span.line, n.span.col) for n in e.notes] == [(6, 17), (10, 26)]
    assert str(e).splitlines()[-2:] == [str(n) for n in e.notes]


def test_a_warning_in_a_block_names_each_call_too():
    g = graph_from_source("""block big(x) {
    return x -> conv(16, kernel=7, pad=same)
}
block outer(x) {
    return x -> big
}
network T {
    input x: [16, 32, 32]
    y = x -> outer
    output y
}
""", "t.cnn")
    (w,) = lint(g)
    assert [str(n) for n in w.notes] == ["note: in block `big` called at t.cnn:5:17",
                                         "note: in block `outer` called at t.cnn:9:14"]


def test_double_softmax_is_allowed_per_line():
    body = """input x: [8]
    s = x -> dense(4) -> softmax{allow}
    output s
    loss softmax_cross_entropy(s)"""
    g = graph_from_source("network T {\n" + body.format(allow="") + "\n}\n")
    assert [d.code for d in lint(g)] == ["W111"]
    g = graph_from_source("network T {\n" + body.format(allow="   # convdsl: allow W111") + "\n}\n")
    assert lint(g) == ()
    g = graph_from_source("network T {\n" + body.replace("softmax_cross_entropy", "mse").format(allow="") + "\n}\n")
    assert lint(g) == ()


# ---- several errors -----------------------------------------------------------------------------

def test_independent_statements_each_report_their_error_in_order():
    e = error_of("""network T {
    input x: [3, 16, 16]
    a = x -> swish
    b = x -> conv(4, kernel=3) -> maxpol(2)
    c = x -> conv(4, kernel=3) -> relu
    output c
    loss cross(c)
}
""")
    assert isinstance(e, ConvDSLErrors) and isinstance(e, ConvDSLError)
    assert [(one.span.line, one.message.split(";")[0].split(":")[0]) for one in e.errors] == [
        (3, "unknown op `swish`"), (4, "unknown op `maxpol`"), (7, "unknown loss `cross` (known")]
    assert (e.span, e.message) == (e.errors[0].span, e.errors[0].message)
    assert str(e) == "\n".join(str(one) for one in e.errors)


def test_uses_of_a_failed_definition_are_not_reported_again():
    e = error_of("""network T {
    input x: [3, 16, 16]
    layer L = Linear(4)
    a = x -> swish
    b = a -> relu -> L
    repeat 2 {
        r = x -> convv(3, kernel=1)
        a = a -> relu
    }
    z = r -> add(a)
    output z, b
}
""")
    # b reads a and L; the repeat (one statement) fails at convv and marks r and a; z and the
    # output read them.
    assert [one.span.line for one in e.errors] == [3, 4, 7]


def test_one_error_stays_a_plain_error_and_identical_ones_are_shown_once():
    e = error_of("network T {\n input x: [3, 16, 16]\n y = x -> swish\n output y\n}\n")
    assert type(e) is ConvDSLError and e.errors == (e,)
    e = error_of("""block b(x) {
    return x -> swish
}
network T {
    input x: [3, 16, 16]
    y = x -> b
    z = x -> b
    output y, z
}
""")
    assert type(e) is ConvDSLError


def test_the_number_of_errors_is_limited():
    lines = "\n".join(f"    y{i} = x -> swish{i}" for i in range(MAX_ERRORS + 5))
    e = error_of(f"network T {{\n    input x: [3, 16, 16]\n{lines}\n    output x\n}}\n")
    assert len(e.errors) == MAX_ERRORS
    assert str(e).endswith(f"convdsl: note: stopped after {MAX_ERRORS} errors")
