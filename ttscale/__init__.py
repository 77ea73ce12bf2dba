"""ttscale: test-time compute orchestration for LLM reasoning."""

from ttscale.budget import Budget, Limits
from ttscale.controller import Context
from ttscale.pipeline import Pipeline, asolve, solve
from ttscale.shared_backends import close_shared_backends
from ttscale.strategies.registry import make_strategy, strategies
from ttscale.types import Branch, Delta, Problem, Result, SamplingSpec, Trace, Usage

__all__ = ["Branch", "Budget", "Context", "Delta", "Limits", "Pipeline", "Problem", "Result", "SamplingSpec", "Trace",
           "Usage", "asolve", "close_shared_backends", "make_strategy", "solve", "strategies"]
__version__ = "0.1.0"
