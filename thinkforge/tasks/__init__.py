"""Task registry: synthetic tasks and benchmarks share `thinkforge.tasks.base.Task`."""

from thinkforge.tasks import arith, benchmarks, code, vision  # noqa: F401  (register)
from thinkforge.tasks.base import TASKS, Problem, Score, Task, get_task, register_task

__all__ = ["TASKS", "Problem", "Score", "Task", "get_task", "register_task"]
