"""Built-in tasks (datasets, rewards with feedback, evaluation) for demos, examples and tests."""
