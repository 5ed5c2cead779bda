"""The C target: OpenMP C99 kernels and a C module behind a cffi wrapper.

What it says differently from the base (targets/base.py) is here, each as a small hook that
returns one token or one call: the scalar types and math function names, how a number and a
run-time size are written, and the overflow-checked size operations of prepare. Everything
longer is C in its templates (templates/c/): how a kernel argument is declared and where the
host finds it, how a kernel is launched and its loops split across threads
(templates/c/lib/target.j2), the kernels (ops/, losses/) and the host glue (module.c.j2,
header.h.j2).
"""
from __future__ import annotations

import hashlib

from ..errors import ConvDSLError
from .base import INT64_MAX, KernelLibrary, Target

INT32_MAX = 2 ** 31 - 1
_KERNEL_LIBRARIES: dict[str, KernelLibrary] = {}     # one rendering per element type and process

_SCALAR = {"f32": "float", "f64": "double"}
_MATH = {"f32": {"exp": "expf", "tanh": "tanhf", "sqrt": "sqrtf", "log": "logf", "fabs": "fabsf", "erf": "erff"},
         "f64": {"exp": "exp", "tanh": "tanh", "sqrt": "sqrt", "log": "log", "fabs": "fabs", "erf": "erf"}}


def c_int(n: int) -> str:
    """An integer as C: a plain literal within int range, `INT64_C(n)` beyond it, so that every
    size reads as 64-bit in any expression; past int64 it cannot be written at all (gcc once
    said "integer constant is too large" and wrapped it, and no one saw the warning)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConvDSLError(None, f"internal error: {n!r} is not an integer for generated code")
    if not -INT64_MAX <= n <= INT64_MAX:
        raise ConvDSLError(None, f"the number {n} is too large for the generated code: sizes, counts and "
                                 f"offsets must stay below 2^63")
    return str(n) if -INT32_MAX <= n <= INT32_MAX else f"INT64_C({n})"


class CHost:
    """How host C writes a number, a run-time size and prepare's overflow-checked size
    arithmetic: the C target's, and the OpenCL target's too, whose host code is C."""

    def float_literal(self, value: float, dtype: str) -> str:
        text = repr(float(value))
        if "inf" in text or "nan" in text:
            raise ConvDSLError(None, f"cannot use {value} in generated code")
        return text + ("f" if dtype == "f32" else "")

    def size_slot(self, index: int, on_host: bool) -> str:
        # prepare fills m->dim; a kernel gets the same array as its `dim` argument.
        return f"m->dim[{index}]" if on_host else f"dim[{index}]"

    def run_time_size(self, index: int) -> str:
        return f"m->sym[{index}]"

    # prepare's checked arithmetic (module.c.j2 defines cdsl_add … and the `overflow` flag)
    def checked_add(self, a: str, b: str) -> str:
        return f"cdsl_add(&overflow, {a}, {b})"

    def checked_sub(self, a: str, b: str) -> str:
        return f"cdsl_sub(&overflow, {a}, {b})"

    def checked_mul(self, a: str, b: str) -> str:
        return f"cdsl_mul(&overflow, {a}, {b})"

    def floordiv(self, a: str, k: str) -> str:
        return f"cdsl_floordiv({a}, {k})"       # C's `/` truncates toward zero

    def maximum(self, a: str, b: str) -> str:
        return f"cdsl_max({a}, {b})"


class CTarget(CHost, Target):
    name = "c"
    template_dir = "c"
    kernel_ext = "c"
    poisons_guard_zones = True
    runs_eval_schedule = True
    runs_batched_alternatives = True
    kernel_library_parts = ("gemm",)     # im2col, winograd: header only (their constant sizes pay)

    def kernel_library(self, dtype: str) -> KernelLibrary:
        """templates/c/kernels.c.j2 for `dtype`, the same text for every network: its function
        names carry a hash of the source (rendered first with the element type alone), so that
        a program linking two networks gets one copy only where the code is the same."""
        if dtype not in _KERNEL_LIBRARIES:
            template = self.environment().get_template("c/kernels.c.j2")
            name = f"cdsl_kernels_{dtype}"
            context = {"ctype": self.scalar_type(dtype), "kernel_helpers": self.kernel_library_parts,
                       "kernels_name": name}
            draft = template.render(kernels_tag=dtype, **context)
            tag = f"{dtype}_{hashlib.sha256(draft.encode()).hexdigest()[:10]}"
            _KERNEL_LIBRARIES[dtype] = KernelLibrary(name, tag, template.render(kernels_tag=tag, **context))
        return _KERNEL_LIBRARIES[dtype]

    def scalar_type(self, dtype: str) -> str:
        return _SCALAR[dtype]

    def math_functions(self, dtype: str) -> dict[str, str]:
        return dict(_MATH[dtype])

    def int_literal(self, n: int) -> str:
        return c_int(n)


C = CTarget()


def checked_c(d, var) -> str:
    """A run-time size as the C target's prepare computes it (every step overflow-checked)."""
    return C.checked_size(d, var)
