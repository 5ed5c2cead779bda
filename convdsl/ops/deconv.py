"""deconv: transposed convolution for learned up-sampling (§3.11), with PyTorch ConvTranspose semantics.

A transposed convolution is the adjoint of a convolution: its forward pass is a conv's
backward-data pass and its backward-data pass is a conv's forward. Per axis:
    out = (in − 1)·s − 2·pad + r·(k − 1) + output_pad + 1
"""
from __future__ import annotations

from fractions import Fraction

from ..ir import dims as D
from ..ir.graph import Init, ParamSpec, TensorType
from .base import INPUTS, Arg, OpDef, Symbol, expect_bool, expect_int, init_arg, parse_init, register
from .spatial import as3d, effective_kernel, input_rank_check, per_axis


def _x(values) -> str:
    return "×".join(map(str, values))


@register
class Deconv(OpDef):
    name = "deconv"
    saves_for_backward = frozenset({INPUTS})   # dW += X · im2col(dY)ᵀ (dX needs the weights only)
    parallel = "the GEMM's rows for large products"
    # The bias and the ops after it (activations, a residual add, a scale) are applied in one
    # pass over each sample's finished output, after col2im has added every tap into it.
    fuses_epilogue = True
    aliases = ("conv_transpose", "transposed_conv", "deconvolution")
    summary = "transposed convolution (PyTorch ConvTranspose): learned up-sampling (§3.11)"
    args = (Arg("out"), Arg("kernel"), Arg("stride", 1),
            Arg("pad", 0, forms="an integer or a tuple per axis (it trims the output, as in PyTorch)"),
            Arg("output_pad", 0), Arg("groups", 1), Arg("dilation", 1), Arg("bias", True), init_arg(),
            Arg("frozen", False))
    c_helpers = ("gemm", "im2col")

    def backward_reads(self, attrs):
        # The input is read for the weight gradient only, which a frozen layer does not compute.
        return frozenset() if attrs["frozen"] else self.saves_for_backward

    def normalize(self, attrs, in_types, ctx):
        (t,) = in_types
        rank = input_rank_check(self.name, t, ctx)
        cin = t.channels
        if not isinstance(cin, int):
            raise ctx.error(f"deconv needs a fixed channel count; the input is {ctx.shape_text(t)}")
        out = expect_int(attrs["out"], "out", ctx, "out", minimum=1)
        groups = expect_int(attrs["groups"], "groups", ctx, "groups", minimum=1)
        if cin % groups or out % groups:
            raise ctx.error(f"groups={groups} must divide both the input channels ({cin}) and the output "
                            f"channels ({out})", arg="groups")
        kernel = per_axis(attrs["kernel"], rank, ctx, "kernel")
        stride = per_axis(attrs["stride"], rank, ctx, "stride")
        dilation = per_axis(attrs["dilation"], rank, ctx, "dilation")
        pad = attrs["pad"]
        if isinstance(pad, Symbol):
            raise ctx.error(f"deconv's `pad` is an integer or a tuple with one per axis, as in PyTorch's "
                            f"ConvTranspose (it trims that many cells from both ends of the output); "
                            f"got `{pad.name}`", arg="pad")
        pads = per_axis(pad, rank, ctx, "pad", minimum=0)
        output_pad = per_axis(attrs["output_pad"], rank, ctx, "output_pad", minimum=0)
        for op, s, r in zip(output_pad, stride, dilation):
            # PyTorch's rule: the extra cells must fall inside one stride (or dilation) step.
            if op >= max(s, r):
                raise ctx.error(f"`output_pad` must be smaller than the stride or the dilation on every axis "
                                f"(as in PyTorch): output_pad {_x(output_pad)}, stride {_x(stride)}, "
                                f"dilation {_x(dilation)}", arg="output_pad")
        return {
            "out": out, "in": cin, "groups": groups, "kernel": kernel, "stride": stride, "dilation": dilation,
            "pad": pads, "output_pad": output_pad,
            "bias": expect_bool(attrs["bias"], ctx, "bias"), "init": parse_init(attrs["init"], ctx),
            "frozen": expect_bool(attrs["frozen"], ctx, "frozen"),
        }

    def infer(self, in_types, attrs, ctx):
        (t,) = in_types
        keff = effective_kernel(attrs["kernel"], attrs["dilation"])
        outs = tuple(D.add(D.mul(D.sub(size, 1), s), k - 2 * p + op)
                     for size, s, k, p, op in zip(t.spatial, attrs["stride"], keff, attrs["pad"],
                                                  attrs["output_pad"]))
        if any(isinstance(o, int) and o < 1 for o in outs):
            shown = "×".join(str(max(o, 0)) if isinstance(o, int) else D.to_text(o) for o in outs)
            raise ctx.error(f"deconv: output would be {shown}: input {_x(D.to_text(s) for s in t.spatial)}, "
                            f"kernel {_x(attrs['kernel'])}, pad {_x(attrs['pad'])}; use a smaller pad",
                            arg="pad")
        return TensorType((attrs["out"], *outs))

    def param_specs(self, in_types, attrs):
        k = attrs["kernel"]
        kprod = D.product(k)
        # The fans of the convolution this one transposes, seen from its own input and output.
        fan_in = attrs["in"] // attrs["groups"] * kprod
        fan_out = attrs["out"] // attrs["groups"] * kprod
        trainable = not attrs["frozen"]
        specs = [ParamSpec("weight", (attrs["in"], attrs["out"] // attrs["groups"], *k), attrs["init"], trainable,
                           fan_in, fan_out)]
        if attrs["bias"]:
            specs.append(ParamSpec("bias", (attrs["out"],), Init("zeros"), trainable, fan_in, fan_out))
        return tuple(specs)

    def macs(self, in_types, out, attrs):
        # Every input value meets every tap of the out/groups kernels of its group once.
        per_in = attrs["out"] // attrs["groups"] * D.product(attrs["kernel"])
        return D.mul(attrs["in"] * per_in, D.product(in_types[0].spatial))

    def scratch_elements(self, in_types, out, attrs):
        # The column matrix [out · kernel taps, input positions] of one sample.
        return D.mul(attrs["out"] * D.product(attrs["kernel"]), D.product(in_types[0].spatial))

    def window(self, in_types, attrs):
        # An output cell is reached from at most ceil(k_eff / s) consecutive input cells, and
        # one step on the output is 1/s of a step on the input: the map gets finer.
        keff = effective_kernel(attrs["kernel"], attrs["dilation"])
        span = tuple((k - 1) // s + 1 for k, s in zip(keff, attrs["stride"]))
        step = tuple(Fraction(1, s) if s > 1 else 1 for s in attrs["stride"])
        return span, step

    def describe(self, attrs):
        parts = [str(attrs["out"]), f"k={_x(attrs['kernel'])}"]
        if any(s > 1 for s in attrs["stride"]):
            parts.append(f"s={_x(attrs['stride'])}")
        if any(attrs["pad"]):
            parts.append(f"pad={_x(attrs['pad'])}")
        if any(attrs["output_pad"]):
            parts.append(f"output_pad={_x(attrs['output_pad'])}")
        if any(r > 1 for r in attrs["dilation"]):
            parts.append(f"r={_x(attrs['dilation'])}")
        if attrs["groups"] > 1:
            parts.append(f"g={attrs['groups']}")
        if attrs["frozen"]:
            parts.append("frozen")
        return f"deconv({', '.join(parts)})"

    def kernel_context(self, attrs, in_types, out, c):
        # Named as the convolution being transposed: its image is this op's output, its output
        # grid this op's input.
        return {
            "K": as3d(attrs["kernel"], 1), "S": as3d(attrs["stride"], 1), "R": as3d(attrs["dilation"], 1),
            "P": as3d(attrs["pad"], 0),
            "I": tuple(c(d) for d in as3d(in_types[0].spatial, 1)),
            "O": tuple(c(d) for d in as3d(out.spatial, 1)),
        }
