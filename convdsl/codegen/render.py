"""Lowered program → source, header and cffi declarations, through a backend target.

The rendering itself lives in convdsl/targets/ (a base that walks the program, a subclass per
target); this module is the compiler's entry to it, and holds the rules that keep every name
of the generated code apart.
"""
from __future__ import annotations

import sys

from ..errors import ConvDSLError
from ..lower.program import Program
from ..targets import C, Target
from ..targets.base import Rendered, checked_identifier, comment_safe, layer_function, module_name

__all__ = ["CSource", "check_module_names", "checked_identifier", "comment_safe", "environment", "layer_function",
           "module_name", "render_c"]

CSource = Rendered


# Modules that a generated `build/<name>.py` must not hide: convdsl itself, what it needs at
# run time (with their own dependencies), and what its tests and examples import. The standard
# library comes from sys.stdlib_module_names. A fixed list, not "whatever is importable here",
# so that a file compiles or not the same way on every machine.
DEPENDENCY_MODULES = frozenset({
    "convdsl", "numpy", "cffi", "_cffi_backend", "pycparser", "lark", "jinja2", "markupsafe",
    "setuptools", "pkg_resources", "_distutils_hack", "pip",
    "torch", "pytest", "_pytest", "hypothesis", "jsonschema", "sklearn", "scipy",
})


def _hidden_module(module: str) -> str | None:
    """What importing `module` from the build folder would hide, said for a message; None if nothing."""
    if module == "convdsl":
        return "`convdsl` itself, which the generated module imports"
    if module in sys.stdlib_module_names or module == "__main__":
        return f"the standard library's `{module}`"
    if module in DEPENDENCY_MODULES:
        return f"`{module}`, which convdsl or its users import"
    return None


# The public C API is `<prefix>_<suffix>` for these suffixes (templates/c/header.h.j2 declares
# exactly these; tests/e2e/test_module_names.py checks that the two agree).
API_SUFFIXES = (
    "adam", "adamw", "alloc_optimizer_state", "arena_bytes", "backward", "buffer_data",
    "buffer_dim", "buffer_name", "buffer_rank", "buffer_size", "compute_grads", "create",
    "destroy", "forward", "grad_data", "has_loss", "input_shape", "last_error", "load_weights",
    "loss", "loss_grad", "model", "num_buffers", "num_inputs", "num_outputs", "num_params",
    "num_sizes", "optimizer", "optimizer_defaults", "optimizer_kind", "optimizer_state",
    "optimizer_steps", "output_shape", "param_data", "param_dim", "param_name", "param_rank",
    "param_size", "param_trainable", "prepare", "real", "reset_optimizer",
    "set_keep_for_backward", "set_memory_limit", "set_optimizer_steps", "set_threads", "set_training", "sgd",
    "train_step", "update", "workspace_bytes",
)

# Functions of that form which the C library defines (glibc's exported symbols) or its C11 and
# POSIX headers declare: `network timer` would define `timer_create`, which the C compiler rejects
# next to <time.h> (Python.h includes it), and `network pthread` or `network epoll` would export
# a `pthread_create` or an `epoll_create` from libpthread.so / libepoll.so that replaces the C
# library's in every program linked against it. A fixed list, so that a name is refused or not
# the same way on every machine; tests/e2e/test_module_names.py checks it against this machine's
# headers and libc.
C_LIBRARY_FUNCTIONS = frozenset({
    "argz_create", "authdes_create", "authdes_pk_create", "authnone_create", "authunix_create",
    "clnt_create", "clntraw_create", "clnttcp_create", "clntudp_create", "clntunix_create",
    "cnd_destroy", "epoll_create", "memfd_create", "mtx_destroy", "posix_spawn_file_actions_destroy",
    "posix_spawnattr_destroy", "pthread_attr_destroy", "pthread_barrier_destroy",
    "pthread_barrierattr_destroy", "pthread_cond_destroy", "pthread_condattr_destroy",
    "pthread_create", "pthread_key_create", "pthread_mutex_destroy", "pthread_mutexattr_destroy",
    "pthread_rwlock_destroy", "pthread_rwlockattr_destroy", "pthread_spin_destroy", "sem_destroy",
    "svcfd_create", "svcraw_create", "svctcp_create", "svcudp_create", "svcunix_create",
    "svcunixfd_create", "thrd_create", "timer_create", "timerfd_create", "tss_create",
    "xdrmem_create", "xdrrec_create", "xdrstdio_create",
})


def _c_library_clash(module: str) -> str | None:
    """The C library function that the network's C API would define, or None."""
    for suffix in API_SUFFIXES:
        if f"{module}_{suffix}" in C_LIBRARY_FUNCTIONS:
            return f"{module}_{suffix}"
    return None


def check_module_names(networks) -> None:
    """Every network of a file must become a module of its own that imports as itself: not one
    that hides another module (`network os` would make `import os` load the network), and not
    one that two networks share (`Net` and `NET` would both write `net.py`).
    `networks` are the file's ast.Network items; errors point at the name."""
    seen: dict[str, object] = {}
    for net in networks:
        module = net.name.lower()
        hidden = _hidden_module(module)
        if hidden is not None:
            raise ConvDSLError(net.span, f"network `{net.name}` would be a Python module named `{module}`, "
                                         f"which would hide {hidden}; rename the network, e.g. `{net.name}Net`")
        clash = _c_library_clash(module)
        if clash is not None:
            raise ConvDSLError(net.span, f"network `{net.name}` would define the C function `{clash}`, which the "
                                         f"C library already declares; rename the network, e.g. `{net.name}Net`")
        if module in seen:
            first = seen[module]
            raise ConvDSLError(net.span, f"networks `{first.name}` (line {first.span.line}) and `{net.name}` "
                                         f"would both be the Python module `{module}` (module names are the "
                                         f"network names lower-cased); rename one, e.g. `{net.name}2`")
        seen[module] = net


# Names in the generated C file, and why no two can be equal whatever the .cnn file says:
#   public API   `<prefix>_<suffix>`: the prefix is the network name lower-cased and every suffix
#                (create, loss, forward, …, real, model) is lower case, so a public name never
#                holds an upper-case letter;
#   helpers      `cdsl_<lower case>` fixed in templates/c, `real`, `model_t`: none ends in
#                `_<public suffix>` and `real` has no `_`, so none is `<prefix>_<suffix>` for any
#                prefix (tests/e2e/test_identifiers.py checks every template for both rules);
#   layers       `cdsl_L<node id>_<label>` below: the upper-case `L` keeps them apart from every
#                public name and every helper, and the id, followed by `_` and a label that cannot
#                start with a digit, keeps two layers apart; `cdsl_` keeps them off C keywords and
#                every library name (no header uses that prefix).
# Nothing else from the file becomes an identifier: value, input and parameter names reach the
# C only inside comments and string literals.
# (layer_function is in targets/base.py.)


def environment():
    """The C target's Jinja environment, for the files beside the module (Makefile, Python wrapper)."""
    return C.environment()


def render_c(program: Program, target: Target = C) -> Rendered:
    """The source of a lowered program; reads the program only, never the graph or the plan."""
    return target.render(program)
