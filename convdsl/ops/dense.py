"""dense (fully connected) and flatten (§2.4, §2.5)."""
from __future__ import annotations

from ..ir import dims as D
from ..ir.graph import Init, ParamSpec, TensorType
from .base import INPUTS, Arg, OpDef, expect_bool, expect_int, init_arg, parse_init, register


@register
class Flatten(OpDef):
    name = "flatten"
    saves_for_backward = frozenset()           # dy reshaped
    relatives = ("reshape", "view")
    summary = "→ [C·H·W] in the layout's order (C,H,W for NCHW; H,W,C for NHWC)"
    flattens = True

    def normalize(self, attrs, in_types, ctx):
        return {"layout": ctx.layout}

    def infer(self, in_types, attrs, ctx):
        return TensorType((D.product(in_types[0].shape),))

    def kernel_context(self, attrs, in_types, out, c):
        t = in_types[0]
        # Buffers are channel-first inside; NHWC's flatten order puts channels last.
        permute = attrs["layout"] == "NHWC" and len(t.shape) > 1 and t.spatial and D.product(t.spatial) != 1
        return {"permute": bool(permute), "C": c(t.channels), "spatial": c(D.product(t.spatial))}


@register
class Dense(OpDef):
    name = "dense"
    saves_for_backward = frozenset({INPUTS})   # dW += dYᵀ · X (dX needs the weights only)
    parallel = "the GEMM's rows for large products"
    fuses_epilogue = True
    fully_connected = True
    map_form = "conv"              # on a [C, *S] map: a conv with kernel S (convert --fc-to-conv)
    aliases = ("linear", "fc", "fully_connected", "inner_product", "gemm")
    summary = "fully connected: y = W·x + b; a map input is flattened first"
    args = (Arg("out"), Arg("bias", True), init_arg(), Arg("frozen", False))
    c_helpers = ("gemm",)

    def backward_reads(self, attrs):
        # The input is read for the weight gradient only, which a frozen layer does not compute.
        return frozenset() if attrs["frozen"] else self.saves_for_backward

    def expand(self, builder, inputs, attrs, ctx):
        t = builder.type_of(inputs[0])
        if len(t.shape) == 1:
            return None
        if not t.is_static():
            raise self.variable_input_error(t, ctx)
        flat = builder.apply_primitive("flatten", inputs, {}, ctx, "flatten")
        return builder.apply_primitive("dense", (flat,), attrs, ctx, None)

    @staticmethod
    def variable_input_error(t, ctx):
        name = ctx.input_names[0] if ctx.input_names else "x"
        return ctx.error(f"dense needs a fixed-size input: `{name}` is {ctx.shape_text(t)}; add globalavgpool")

    def normalize(self, attrs, in_types, ctx):
        t = in_types[0]
        if not isinstance(t.shape[0], int):
            raise self.variable_input_error(t, ctx)
        return {"out": expect_int(attrs["out"], "out", ctx, "out", minimum=1), "in": t.shape[0],
                "bias": expect_bool(attrs["bias"], ctx, "bias"), "init": parse_init(attrs["init"], ctx),
                "frozen": expect_bool(attrs["frozen"], ctx, "frozen")}

    def infer(self, in_types, attrs, ctx):
        return TensorType((attrs["out"],))

    def param_specs(self, in_types, attrs):
        trainable = not attrs["frozen"]
        specs = [ParamSpec("weight", (attrs["out"], attrs["in"]), attrs["init"], trainable,
                           attrs["in"], attrs["out"])]
        if attrs["bias"]:
            specs.append(ParamSpec("bias", (attrs["out"],), Init("zeros"), trainable, attrs["in"], attrs["out"]))
        return tuple(specs)

    def macs(self, in_types, out, attrs):
        return attrs["in"] * attrs["out"]

    def describe(self, attrs):
        return f"dense({attrs['out']}" + (", frozen" if attrs["frozen"] else "") + ")"
