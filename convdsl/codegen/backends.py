"""Backends: what differs between targets is only where their templates live.

The plan, the template context and the Python runtime are shared; a backend names its
template folder. An op kind without a template in that folder is unsupported there, and
`check_supported` says so at check time, at the op's line.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import resources
from ..errors import ConvDSLError
from ..ir.graph import Graph
from ..ops.base import lookup
from ..ops.losses import LOSSES


@dataclass(frozen=True)
class Backend:
    name: str
    template_dir: str          # folder under templates/
    kernel_ext: str            # ops/<kind>.<ext>.j2

    def op_template(self, op) -> str:
        return self.kernel_template(op.template or op.name)

    def kernel_template(self, stem: str) -> str:
        """The template of a kernel variant (`conv`, `conv_direct`) on this target."""
        return f"{self.template_dir}/ops/{stem}.{self.kernel_ext}.j2"

    def loss_template(self, loss) -> str:
        return f"{self.template_dir}/losses/{loss.name}.{self.kernel_ext}.j2"

    def module_template(self) -> str:
        return f"{self.template_dir}/module.{self.kernel_ext}.j2"

    def header_template(self) -> str:
        return f"{self.template_dir}/header.h.j2"

    def has_template(self, name: str) -> bool:
        return (resources.templates_dir() / name).is_file()

    def check_supported(self, graph: Graph) -> None:
        for node in graph.nodes:
            if not self.has_template(self.op_template(lookup(node.op))):
                raise ConvDSLError(node.span, f"`{node.op}` is not supported by the {self.name} backend")
        if graph.loss is not None and not self.has_template(self.loss_template(LOSSES[graph.loss.kind])):
            raise ConvDSLError(graph.loss.span, f"loss `{graph.loss.kind}` is not supported by the {self.name} backend")

    def check_program(self, program) -> None:
        """Every step's variant has its template here (the plan may pick one another target lacks)."""
        for step in program.forward:
            if not self.has_template(self.kernel_template(step.variant_template)):
                raise ConvDSLError(None, f"{step.op} {step.label} (line {step.line}): kernel variant "
                                         f"`{step.variant}` is not supported by the {self.name} backend")


C = Backend("c", "c", "c")
BACKENDS = {"c": C}
