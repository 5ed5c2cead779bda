"""dense (fully connected), flatten and reshape (§2.4, §2.5)."""
from __future__ import annotations

import math

from ..ir import dims as D
from ..ir.graph import Init, ParamSpec, TensorType
from .base import (INPUTS, Arg, OpDef, check_attribute_size, describe_value, expect_bool, expect_int, init_arg,
                   parse_init, register)


@register
class Flatten(OpDef):
    name = "flatten"
    saves_for_backward = frozenset()           # dy reshaped
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
    # At a batch of up to this many samples the forward is dot products of weight rows with each
    # sample (lib/gemm's cdsl_gemm_dot): the packed GEMM would copy the whole weight matrix,
    # transposed, on every call and fill its rows with zeros (measured, benchmarks/RESULTS.md).
    dot_columns = 8
    fuses_epilogue = True
    # The C kernels' backward stores its GEMMs where the plan lets it instead of adding: dW and db
    # (a layer not shared), dX (whose step is the first to touch it).
    writes_param_grads = ("c",)
    writes_input_grad = (("c", lambda attrs: True),)
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


@register
class Reshape(OpDef):
    """The same values under another shape, read and written in the layout's order (C, H, W in
    NCHW; H, W, C in NHWC, where the shape is written channels last as `input` has it): the
    flatten and unflatten of ONNX graphs, `reshape([8, 4, 4])` of a vector of 128."""
    name = "reshape"
    saves_for_backward = frozenset()           # dy under the input's shape
    aliases = ("view", "unflatten")
    summary = "the same values under another shape, in the layout's order; element counts must match"
    args = (Arg("shape", shape=True, forms="a shape written as a list, such as [8, 4, 4]; one size may be -1"),)

    def normalize(self, attrs, in_types, ctx):
        (t,) = in_types
        written = attrs["shape"]
        written = written if isinstance(written, tuple) else (written,)
        if not 1 <= len(written) <= 4:
            raise ctx.error(f"`shape` must have 1 to 4 sizes (a vector or a map of 1 to 3 spatial axes), "
                            f"got {describe_value(attrs['shape'])}", arg="shape")
        for v in written:
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise ctx.error(f"`shape` sizes must be positive integers (or one -1, for the size that makes "
                                f"the counts match), got {describe_value(attrs['shape'])}", arg="shape")
            check_attribute_size(v, ctx, "shape")
        if not all(isinstance(d, int) for d in t.shape):
            raise ctx.error(f"reshape needs an input of fixed size; the input is {ctx.shape_text(t)}")
        count = D.product(t.shape)
        if written.count(-1) > 1:
            raise ctx.error("`shape` may leave one size to be inferred (-1), not more", arg="shape")
        known = math.prod(v for v in written if v != -1)
        if -1 in written:
            if count % known:
                raise ctx.error(f"reshape: no size for -1 makes {describe_value(written)} hold the {count} values "
                                f"of the input {ctx.shape_text(t)}", arg="shape")
            written = tuple(count // known if v == -1 else v for v in written)
        elif known != count:
            raise ctx.error(f"reshape: [{', '.join(map(str, written))}] holds {known} values but the input "
                            f"{ctx.shape_text(t)} holds {count}", arg="shape")
        # Buffers are channel-first inside; a map written in NHWC has its channels last.
        shape = written if ctx.layout == "NCHW" or len(written) == 1 else (written[-1], *written[:-1])
        return {"shape": shape, "layout": ctx.layout}

    def infer(self, in_types, attrs, ctx):
        return TensorType(attrs["shape"])

    def describe(self, attrs):
        shape = attrs["shape"]
        shown = shape if attrs["layout"] == "NCHW" or len(shape) == 1 else (*shape[1:], shape[0])
        return f"reshape([{', '.join(map(str, shown))}])"

    def kernel_context(self, attrs, in_types, out, c):
        def channels_last(t):
            return attrs["layout"] == "NHWC" and t.rank > 1 and D.product(t.spatial) != 1
        t = in_types[0]
        return {"permute_in": channels_last(t), "permute_out": channels_last(out),
                "C_in": c(t.channels), "S_in": c(D.product(t.spatial)),
                "C_out": c(out.channels), "S_out": c(D.product(out.spatial)), "numel": c(D.product(out.shape))}
