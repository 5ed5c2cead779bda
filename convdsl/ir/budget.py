"""The budgets of one network build: sizes, parameters and compile work, checked as the IR is made.

The numbers are in convdsl/limits.py, read when used (so that a test can lower one). The builder
calls in here once for every statement it runs, every block it applies, every input it declares
and every node and layer it makes, so that each limit is checked once, at the span of the text
that crosses it, and nothing over a limit reaches the passes or the C.
"""
from __future__ import annotations

from .. import limits
from ..errors import ConvDSLError, Span
from ..limits import power_text
from . import dims as D
from .graph import TensorType


def _amount(n: int) -> str:
    return f"{n:,}" if n < 10 ** 15 else f"about 2**{n.bit_length() - 1}"


def short_text(d) -> str:
    """A size as a message can quote it: long run-time expressions are cut."""
    text = D.to_text(d)
    return text if len(text) <= 60 else text[:57] + "…"


class BudgetExceeded(ConvDSLError):
    """A limit on the whole network was crossed (compile work, total parameters or activations):
    every later statement would cross it too, so the build stops here instead of reporting the
    same limit for each of them."""


class Budget:
    """Running totals of one build; each method refuses what would cross a limit."""

    def __init__(self, layout: str):
        self.layout = layout
        self.statements = 0
        self.block_calls = 0
        self.activation = 0          # elements per sample of the fixed-size tensors made so far
        self.params = 0

    # ---- compile work ------------------------------------------------------------------------
    def statement(self, span: Span) -> None:
        """One statement run, or one round of a `repeat` (so that rounds with no layers count)."""
        self.statements += 1
        if self.statements > limits.MAX_STATEMENTS:
            raise BudgetExceeded(span, f"building this network runs more than {limits.MAX_STATEMENTS:,} statements "
                                       "(repeat rounds and block bodies included); nested repeats this large are "
                                       "more work than the compiler will unroll")

    def block_call(self, span: Span) -> None:
        self.block_calls += 1
        if self.block_calls > limits.MAX_BLOCK_CALLS:
            raise BudgetExceeded(span, f"building this network applies blocks more than {limits.MAX_BLOCK_CALLS:,} times "
                                       "(blocks that call other blocks several times multiply)")

    @staticmethod
    def node(count: int, span: Span) -> None:
        if count >= limits.MAX_NODES:
            raise BudgetExceeded(span, f"the network has more than {limits.MAX_NODES:,} layers once repeats and blocks "
                                       "are unrolled")

    # ---- sizes ---------------------------------------------------------------------------------
    @staticmethod
    def size(d, span: Span, what) -> int:
        """Refuses a size expression that could make int64 arithmetic wrap; returns its bound.
        `what` names it in the message: a string, or a function that makes one (only on an error).

        Run-time sizes reach at most limits.MAX_RUNTIME_SIZE (prepare refuses more), so magnitude_bound
        at that size bounds every value the C computes for this expression."""
        def said() -> str:
            return what() if callable(what) else what
        if isinstance(d, int):
            bound = abs(d)
        else:
            pieces, depth = D.expression_shape(d)
            if pieces > limits.MAX_EXPRESSION_TERMS or depth > limits.MAX_EXPRESSION_DEPTH:
                raise ConvDSLError(span, f"{said()} has grown too complex to compute ({pieces:,} pieces, nested "
                                         f"{depth} deep; the limits are {limits.MAX_EXPRESSION_TERMS:,} and "
                                         f"{limits.MAX_EXPRESSION_DEPTH}): give some run-time sizes a fixed value")
            bound = D.magnitude_bound(d, limits.MAX_RUNTIME_SIZE)
        if bound >= limits.SIZE_BOUND:
            at = "" if isinstance(d, int) else f" with run-time sizes up to {power_text(limits.MAX_RUNTIME_SIZE)}"
            raise ConvDSLError(span, f"{said()} could reach {_amount(bound)}{at}, beyond the limit of "
                                     f"{power_text(limits.SIZE_BOUND)} on any size")
        return bound

    def tensor(self, t: TensorType, span: Span, what: str) -> None:
        """A tensor per sample: every dim against limits.SIZE_BOUND; a fixed-size one also counts,
        whole, against the activation budget.

        The element count of a tensor with run-time sizes is not bounded here: with every size
        at its largest a map with three run-time sizes would pass int64 although nobody runs one
        that large. prepare counts each tensor's elements, times the batch, in overflow-checked
        int64 and refuses what does not fit (or exceeds the memory limit) before anything is
        allocated, and every index a kernel computes is below the element count of the tensor
        it indexes, so no index can wrap either."""
        bound = 1
        for d in t.shape:
            if isinstance(d, int):
                bound *= d
            else:
                self.size(d, span, lambda d=d: f"a size of {what} (`{short_text(d)}`)")
        if not t.is_static():
            return
        if bound > limits.MAX_ACTIVATION_ELEMENTS or self.activation + bound > limits.MAX_ACTIVATION_ELEMENTS:
            what = f"{what} {self.shape_text(t)}"       # only spelled out when it is said
        self.add_activation(bound, span, what)

    def shape_text(self, t: TensorType) -> str:
        shape = t.text(self.layout)
        return shape if len(shape) <= 100 else shape[:97] + "…]"

    def add_activation(self, elements: int, span: Span, what: str) -> None:
        if elements > limits.MAX_ACTIVATION_ELEMENTS:
            raise ConvDSLError(span, f"{what} holds {_amount(elements)} elements per sample, beyond the budget of "
                                     f"{power_text(limits.MAX_ACTIVATION_ELEMENTS)} for all the network's tensors")
        self.activation += elements
        if self.activation > limits.MAX_ACTIVATION_ELEMENTS:
            raise BudgetExceeded(span, f"with {what} ({_amount(elements)} elements) the network's tensors hold "
                                       f"{_amount(self.activation)} elements per sample, beyond the budget of "
                                       f"{power_text(limits.MAX_ACTIVATION_ELEMENTS)}")

    def workspace(self, elements, span: Span, what: str) -> None:
        """A per-sample scratch size (im2col's columns): when fixed, no larger than the activation
        budget (it is allocated beside the activations). One that depends on run-time sizes is a
        product of them, like a tensor's element count, and prepare computes it overflow-checked
        (see `tensor`)."""
        if isinstance(elements, int) and elements > limits.MAX_ACTIVATION_ELEMENTS:
            raise ConvDSLError(span, f"{what} needs {_amount(elements)} elements per sample, beyond the budget of "
                                     f"{power_text(limits.MAX_ACTIVATION_ELEMENTS)}")

    # ---- parameters ----------------------------------------------------------------------------
    def layer(self, label: str, specs, span: Span) -> None:
        own = 0
        for p in specs:
            n = 1
            for d in p.shape:
                n *= d
            own += n
        if own > limits.MAX_LAYER_PARAMS:
            raise ConvDSLError(span, f"{label} would have {_amount(own)} parameters, beyond the limit of "
                                     f"{power_text(limits.MAX_LAYER_PARAMS)} per layer")
        self.params += own
        if self.params > limits.MAX_PARAMS:
            raise BudgetExceeded(span, f"with the {_amount(own)} parameters of {label} the network would have "
                                       f"{_amount(self.params)}, beyond the limit of {power_text(limits.MAX_PARAMS)}")
