"""Built-in tasks and the character tokenizer of the built-in model."""

from profiles.tasks.builtin import SPLITS, TASKS, Example, Task, check_task_names, generate, score, split_of
from profiles.tasks.tokenizer import CharTokenizer

__all__ = ["SPLITS", "TASKS", "Example", "Task", "CharTokenizer", "check_task_names", "generate",
           "score", "split_of"]
