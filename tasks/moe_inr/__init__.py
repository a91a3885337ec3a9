"""The moe_inr task: see task.py (the task class) and docs/design.md."""
