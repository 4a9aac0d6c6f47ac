"""Benchmark tasks: cnn_dm, humaneval, topv2 and jsonl:PATH (`datasets`), and the quality of a completion
(`metrics`; HumanEval tests run in `sandbox`). See `datasets` for where each comes from and local copies."""

from skipbench.tasks.datasets import (
    Example,
    TaskData,
    TaskDefaults,
    TaskError,
    available_tasks,
    limit_prompt_tokens,
    load_task,
)
from skipbench.tasks.metrics import score, truncate_completion

__all__ = ["Example", "TaskData", "TaskDefaults", "TaskError", "available_tasks", "limit_prompt_tokens", "load_task",
           "score", "truncate_completion"]
