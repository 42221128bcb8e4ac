"""The vlmq contract: schemas, errors, settings, Redis keys and the job store.

Imported by both the gateway and the worker, so it never imports torch,
transformers or anything else heavy.
"""
