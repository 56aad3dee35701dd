"""Runnable examples of a user's own task (docs/your-own-task.md)."""
