"""Backend targets: one base that renders a lowered program (base.Target) and a subclass per
target that overrides only what differs (c.CTarget, opencl.OpenCLTarget); see
docs/architecture.md, "Backend targets"."""
from .base import Rendered, Target
from .c import C, CTarget
from .opencl import OPENCL, OpenCLTarget

TARGETS: dict[str, Target] = {C.name: C, OPENCL.name: OPENCL}


def target(name: str) -> Target:
    """The target of a backend name (`c`, `opencl`), or an error listing the known ones."""
    from ..errors import ConvDSLError
    if name not in TARGETS:
        raise ConvDSLError(None, f"unknown backend {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["C", "CTarget", "OPENCL", "OpenCLTarget", "Rendered", "Target", "TARGETS", "target"]
