"""The spy the record tests (test_bnspec.py, test_convspec.py) put in place of a flat function."""
import inspect


class Seen:
    """A spy standing in for a flat function: each call's arguments bound to `signature`'s names."""

    def __init__(self, real, signature):
        self.real, self.sig, self.calls = real, inspect.signature(signature), []

    def __call__(self, *args, **kwargs):
        bound = self.sig.bind(*(() if "self" not in self.sig.parameters else (None,)), *args, **kwargs)
        self.calls.append(dict(bound.arguments))
        return self.real(*args, **kwargs)
