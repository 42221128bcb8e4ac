"""The GPU worker: Celery tasks, media resolution and the inference engine."""
