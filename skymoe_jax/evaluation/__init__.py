"""Evaluation of the five RS tasks: metric functions (metrics.py), the task registry with the
per-granularity report (evaluators.py), batched KV-cache generation (generate.py) and the runner.
Nothing is imported here, so generation loads without the captioning metrics' packages."""
