"""Evaluation of the five RS tasks: metric functions (metrics.py) and the task registry with the
per-granularity report (evaluators.py). Pure Python: nothing here imports JAX."""
from skymoe_jax.evaluation.evaluators import (EVALUATORS, Evaluator, get_evaluator,
                                              granularity_report)

__all__ = ['EVALUATORS', 'Evaluator', 'get_evaluator', 'granularity_report']
