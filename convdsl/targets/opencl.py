"""The OpenCL target: OpenCL C kernels, and host code in C over the OpenCL C API.

The second subclass of base.Target. The lowered program, the kernels' arguments (KernelArg),
the size slots and the parameter tables are the base's; what differs is said here in small
hooks (OpenCL C's types and math names, how a number and a run-time size are written) and,
for everything longer, in templates/opencl/:

- `lib/target.j2`: a kernel argument is a `__global` pointer given as a buffer and an element
  offset (OpenCL 1.2 has no pointer arithmetic on the host side of a buffer), a launch is
  clSetKernelArg for each argument then clEnqueueNDRangeKernel over one work-item per output
  element of the kernel, or (`launch_tiles`, conv's `tiled` variant) over work-groups of the
  lowered program's WorkGroupTile, one per tile of the kernel's product;
- `ops/<kind>.cl.j2`: each op's kernels (OpenCL C, rendered into one program source that the
  library embeds as a string) and, as the macros `forward(node)` and `backward(node)`, the
  host's launches of them;
- `module.cl.j2` and `header.h.j2`: the host glue — the same C API as the C backend, plus
  `<prefix>_create_on(seed, device)` and `<prefix>_device_name(m)`.

The losses run on the host, in the C target's templates (templates/c/losses/), over the
network output read back from the device: a loss is one pass over batch × classes values
that ends in one number, and its gradient goes back to the device in one write.
The optimizer too runs on the host, the C target's templates/c/lib/optimizer.c.j2 over the host
mirrors of the parameters and gradients (module.cl.j2 syncs them with the device around each
call): one pass over the parameters per step, whose result the next call writes to the device.
"""
from __future__ import annotations

from ..errors import ConvDSLError
from .base import INT64_MAX, Target
from .c import CHost

INT32_MAX = 2 ** 31 - 1

_SCALAR = {"f32": "float", "f64": "double"}
# OpenCL C's built-ins are overloaded on the argument type: the same names for float and double.
_MATH = {"exp": "exp", "tanh": "tanh", "sqrt": "sqrt", "log": "log", "fabs": "fabs", "erf": "erf"}


def cl_int(n: int) -> str:
    """An integer as OpenCL C and host C both read it: a plain literal within int range, with
    the suffix L beyond it (OpenCL's `long` is 64 bits; on the host an L literal that does not
    fit a long is a long long)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConvDSLError(None, f"internal error: {n!r} is not an integer for generated code")
    if not -INT64_MAX <= n <= INT64_MAX:
        raise ConvDSLError(None, f"the number {n} is too large for the generated code: sizes, counts and "
                                 f"offsets must stay below 2^63")
    return str(n) if -INT32_MAX <= n <= INT32_MAX else f"{n}L"


def c_string(text: str) -> str:
    """Text as adjacent C string literals, a line each; the kernels hold only printable ASCII
    (names from the .cnn file reach them as checked identifiers), anything else is escaped."""
    def escape(ch: str) -> str:
        if ch in '\\"':
            return "\\" + ch
        if " " <= ch <= "~":
            return ch
        return "".join(f"\\{b:03o}" for b in ch.encode())
    lines = text.split("\n")
    return "\n".join('"' + "".join(escape(ch) for ch in line) + ('\\n"' if k < len(lines) - 1 else '"')
                     for k, line in enumerate(lines))


class OpenCLTarget(CHost, Target):
    """Everything a kernel sees is written for OpenCL C; prepare's checked size arithmetic is
    host C, named as the C target names it (the same helpers, defined in module.cl.j2)."""
    name = "opencl"
    template_dir = "opencl"
    kernel_ext = "cl"
    # Its conv kernels are the plan's `tiled` variant (work-groups over tiles, staged in local
    # memory; ops/conv_tiled.cl.j2) or, for every C variant it has, one work-item per output
    # value (ops/conv.cl.j2); these variants' own state (Winograd's kept kernel transforms) and
    # register tiling for the CPU exist only in the C kernels.
    lacks_variants = frozenset({"blocked", "winograd2", "winograd4"})

    def scalar_type(self, dtype: str) -> str:
        return _SCALAR[dtype]

    def math_functions(self, dtype: str) -> dict[str, str]:
        return dict(_MATH)

    def int_literal(self, n: int) -> str:
        return cl_int(n)

    def environment(self):
        """The base's environment, and `c_string`: text as a C string literal, one literal per line
        (the program source that module.cl.j2 embeds)."""
        env = super().environment()
        env.filters.setdefault("c_string", c_string)
        return env

    def loss_template(self, loss) -> str:
        # The loss runs on the host (see the module docstring): the C target's template.
        return f"c/losses/{loss.name}.c.j2"


OPENCL = OpenCLTarget()
