"""Backend targets: one base that renders a lowered program (base.Target) and a subclass per
target that overrides only what differs (c.CTarget). A new target (OpenCL) is a subclass with
its own template folder; see docs/architecture.md, "Backend targets"."""
from .base import Rendered, Target
from .c import C, CTarget

TARGETS: dict[str, Target] = {C.name: C}

__all__ = ["C", "CTarget", "Rendered", "Target", "TARGETS"]
