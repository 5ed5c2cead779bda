"""`convdsl convert --fc-to-conv` (§2.5): the converted network gives the original's output at
the training size and slides it over larger inputs; weights are reshaped in the layout's
flatten order; what cannot be converted is said; and a quick run of the digits example."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import convdsl
from convdsl import ConvDSLError
from convdsl.cli import main
from convdsl.rewrite.fc_to_conv import fc_to_conv
from reference import assert_close, to_nchw, to_nhwc

REPO = Path(__file__).resolve().parents[2]

HEAD_2D = """# a classifier with a dense head
network Head {{
    layout {layout}
    input x: {dims}                       # training size 12×10

    f = x -> conv(6, kernel=3) -> batchnorm -> relu -> maxpool(2)      # [6, 5, 4]
    h = f -> flatten -> dense(16) -> batchnorm -> relu
          -> dropout(0.3)                                               # kept when converted
    y = h -> dense(7)
    output y
    loss softmax_cross_entropy(y)
}}
"""

HEAD_1D = """network Head1 {
    input x: [2, 20]
    y = x -> conv(4, kernel=5) -> relu -> maxpool(2) -> dense(5) -> tanh -> dense(3)
    output y
}
"""


def trained_ish(net, rng):
    """Weights of a plausible scale (as training leaves them) and running statistics away from 0 / 1."""
    for name, p in net.params.items():
        fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
        p[...] = rng.standard_normal(p.shape) / np.sqrt(fan_in)
    for name, b in net.buffers.items():
        b[...] = rng.uniform(0.5, 1.5, b.shape) if name.endswith("running_var") else rng.standard_normal(b.shape)


def convert_with_cli(tmp_path, source: str, name: str = "net"):
    """Write `source`, build and save trained-ish weights, convert both with the CLI; return the
    original model, the converted model (weights loaded, eval mode) and the converted text."""
    src = tmp_path / f"{name}.cnn"
    src.write_text(source)
    net = convdsl.load(src).Model(seed=0)
    trained_ish(net, np.random.default_rng(1))
    net.save(tmp_path / f"{name}.npz")
    out = tmp_path / "out" / f"{name}_fcn.cnn"
    assert main(["convert", "--fc-to-conv", str(src), "-o", str(out), "--weights", str(tmp_path / f"{name}.npz")]) == 0
    fcn = convdsl.load(out).Model(seed=5)
    fcn.load(out.with_suffix(".npz"))
    return net.eval(), fcn.eval(), out.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ("NCHW", "NHWC"))
def test_same_output_at_the_training_size_and_a_sliding_window_beyond(tmp_path, layout):
    dims = "[3, 12, 10]" if layout == "NCHW" else "[12, 10, 3]"
    net, fcn, text = convert_with_cli(tmp_path, HEAD_2D.format(layout=layout, dims=dims))
    assert "input x: [3, H, W]" in text if layout == "NCHW" else "input x: [H, W, 3]" in text
    assert "h = f -> conv(16, kernel=(5, 4)) -> batchnorm -> relu -> dropout(0.3)" in text
    assert "y = h -> conv(7, kernel=1)" in text
    assert "# training size 12×10" in text and "# [6, 5, 4]" in text     # untouched lines stay as written
    rng = np.random.default_rng(2)
    to_file = to_nhwc if layout == "NHWC" else (lambda a: a)
    from_file = to_nchw if layout == "NHWC" else (lambda a: a)
    x = rng.standard_normal((4, 3, 12, 10)).astype(np.float32)
    expected = net.forward(to_file(x))
    got = from_file(fcn.forward(to_file(x)))
    assert got.shape == (4, 7, 1, 1)
    assert_close(got.reshape(4, 7), expected, what="training size")
    # On a 16×14 image the output is a 3×3 map; position (i, j) is the original network on the
    # 12×10 crop at (2i, 2j): the conv is valid and one 2×2 pool makes the step 2 (§2.5).
    big = rng.standard_normal((2, 3, 16, 14)).astype(np.float32)
    scores = from_file(fcn.forward(to_file(big)))
    assert scores.shape == (2, 7, 3, 3)
    for i in range(3):
        for j in range(3):
            crop = np.ascontiguousarray(big[:, :, 2 * i:2 * i + 12, 2 * j:2 * j + 10])
            assert_close(scores[:, :, i, j], net.forward(to_file(crop)), what=f"window ({i}, {j})")


@pytest.mark.slow
def test_one_dimensional_maps(tmp_path):
    net, fcn, text = convert_with_cli(tmp_path, HEAD_1D, "one_d")
    assert "input x: [2, L]" in text and "conv(5, kernel=8) -> tanh" in text and "-> conv(3, kernel=1)" in text
    x = np.random.default_rng(3).standard_normal((3, 2, 20)).astype(np.float32)
    assert_close(fcn.forward(x).reshape(3, 3), net.forward(x), what="1-D")
    assert fcn.forward(np.zeros((1, 2, 30), dtype=np.float32)).shape == (1, 3, 6)


@pytest.mark.slow
def test_a_layer_declared_dense_after_a_global_pool(tmp_path):
    src = """network G {
    input x: [3, 9, 9]
    layer FC = dense(4, init=xavier)
    y = x -> conv(5, kernel=3, pad=same) -> relu -> globalavgpool -> FC
    output y
}
"""
    net, fcn, text = convert_with_cli(tmp_path, src, "g")
    assert "layer FC = conv(4, kernel=1, init=xavier)" in text
    assert list(fcn.params) == list(net.params)                  # the layer keeps its name
    x = np.random.default_rng(4).standard_normal((2, 3, 9, 9)).astype(np.float32)
    assert_close(fcn.forward(x).reshape(2, 4), net.forward(x), what="global pool head")


def test_squeeze_and_excitation_denses_stay_and_the_head_converts():
    conversion = fc_to_conv(REPO / "examples" / "inception_se.cnn")
    assert [d.label for d in conversion.dense] == ["dense1"]
    assert "logits = y -> globalavgpool -> conv(10, kernel=1)" in conversion.text
    assert "-> dense(channels(x) // r) -> relu" in conversion.text   # the SE block is as written
    assert conversion.converted.values[conversion.converted.outputs[0].value].type.shape == (10, 1, 1)


def test_use_paths_follow_the_new_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blocks.cnn").write_text("block stem(x) {\n    return x -> conv(4, kernel=3) -> relu\n}\n")
    (tmp_path / "src" / "net.cnn").write_text('use "blocks.cnn"\nnetwork U {\n    input x: [1, 6, 6]\n'
                                              '    y = x -> stem -> flatten -> dense(2)\n    output y\n}\n')
    out = tmp_path / "elsewhere" / "net_fcn.cnn"
    assert main(["convert", "--fc-to-conv", str(tmp_path / "src" / "net.cnn"), "-o", str(out)]) == 0
    assert 'use "../src/blocks.cnn"' in out.read_text()
    assert not out.with_suffix(".npz").exists()
    assert convdsl.load(out).Model().forward(np.zeros((1, 1, 9, 7), dtype=np.float32)).shape == (1, 2, 4, 2)


@pytest.mark.parametrize("body, fragments", [
    ("input x: [3, 8, 8]\n y = x -> conv(4, kernel=3)\n output y", ("no dense layer follows a spatial map",)),
    ("input x: [3, 8, 8]\n input v: [3]\n s = x -> flatten -> dense(3)\n z = add(s, v)\n output z",
     ("cannot become convolutions", "add1", "not part of the classifier head")),
    ("input x: [3, 6, 6]\n y = x -> local(4, kernel=3) -> flatten -> dense(2)\n output y",
     ("does not check with run-time input sizes (H, W)", "local")),
    ("input x: [4, 2, 2]\n input v: [16]\n layer FC = dense(3)\n a = x -> flatten -> FC\n b = v -> FC\n output a, b",
     ("used both in the classifier head and elsewhere",)),
    ("input x: [4, 3, 3]\n y = x -> flatten -> softmax -> dense(2)\n output y",
     ("softmax would mix the positions",)),
], ids=["no-dense", "mixed-add", "local", "shared-elsewhere", "softmax-before-dense"])
def test_what_cannot_be_converted_is_said(tmp_path, body, fragments):
    path = tmp_path / "e.cnn"
    path.write_text("network E {\n" + body + "\n}\n")
    with pytest.raises(ConvDSLError) as info:
        fc_to_conv(path)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, text


def test_a_head_inside_a_block_is_refused(tmp_path):
    path = tmp_path / "b.cnn"
    path.write_text("block head(x) {\n    return x -> flatten -> dense(3)\n}\n"
                    "network B {\n    input x: [2, 4, 4]\n    y = x -> head\n    output y\n}\n")
    with pytest.raises(ConvDSLError, match="inside block `head`"):
        fc_to_conv(path)


def test_cli_errors(tmp_path, capsys):
    src = tmp_path / "n.cnn"
    src.write_text(HEAD_1D)
    assert main(["convert", str(src), "-o", str(tmp_path / "o.cnn")]) == 1
    assert "--fc-to-conv" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", **{"conv1.weight": np.zeros((4, 2, 5))})
    assert main(["convert", "--fc-to-conv", str(src), "-o", str(tmp_path / "o.cnn"),
                 "--weights", str(tmp_path / "wrong.npz")]) == 1
    err = capsys.readouterr().err
    assert "do not belong to network Head1" in err and "missing" in err
    assert not (tmp_path / "o.cnn").exists()                     # nothing written on failure
    np.savez(tmp_path / "shape.npz", **{name: np.zeros((1,)) for name in
                                        ("conv1.weight", "conv1.bias", "dense1.weight", "dense1.bias",
                                         "dense2.weight", "dense2.bias")})
    assert main(["convert", "--fc-to-conv", str(src), "-o", str(tmp_path / "o.cnn"),
                 "--weights", str(tmp_path / "shape.npz")]) == 1
    assert "conv1.weight` has shape [1]" in capsys.readouterr().err


def test_weights_out_names_the_file(tmp_path):
    src = tmp_path / "n.cnn"
    src.write_text(HEAD_1D)
    convdsl.load(src).Model(seed=0).save(tmp_path / "w.npz")
    target = tmp_path / "custom" / "weights"
    assert main(["convert", "--fc-to-conv", str(src), "-o", str(tmp_path / "o.cnn"), "--weights",
                 str(tmp_path / "w.npz"), "--weights-out", str(target)]) == 0
    with np.load(target) as data:                                # written as named, no suffix added
        assert data["conv2.weight"].shape == (5, 4, 8) and data["conv3.weight"].shape == (3, 5, 1)


@pytest.mark.slow
def test_digits_example_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("fc_to_conv_digits", REPO / "examples" / "fc_to_conv_digits.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    result = example.run(epochs=6, canvases=100, quiet=True, out=tmp_path)
    assert result["accuracy"] >= 0.93
    assert result["max_diff"] <= 1e-4
    assert result["class_map_shape"] == (100, 10, 1, 7)
    # The windows on the digits find them about as well as the original network does one by one.
    assert result["per_digit"] >= 0.9 and result["per_digit"] >= result["alone"] - 0.05
    assert (tmp_path / "digits_fcn.cnn").exists() and (tmp_path / "digits_fcn.npz").exists()
