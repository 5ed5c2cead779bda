"""The compiler's middle: the checked graph lowered to a program of steps that backends render."""
from .plan import algo_override, lower
from .program import Program, Step

__all__ = ["Program", "Step", "algo_override", "lower"]
