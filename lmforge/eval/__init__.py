"""Evaluation: tasks as data (YAML + JSONL), lm-eval-compatible scoring, sandboxed code execution, judging.

Heavy imports (torch) live in the submodules; ``from lmforge.eval.runner import evaluate`` is the entry point.
"""

from lmforge.eval.tasks import Task, builtin_tasks, load_task, resolve_task

__all__ = ["Task", "builtin_tasks", "load_task", "resolve_task"]
