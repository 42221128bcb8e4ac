"""The HTTP gateway: validates, authenticates, enqueues and reports jobs.

It stays small and starts fast: it never imports torch or transformers.
"""
