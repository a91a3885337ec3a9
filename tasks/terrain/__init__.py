"""The terrain task: see task.py (the task class) and docs/design.md."""
