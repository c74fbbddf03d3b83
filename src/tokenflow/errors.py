"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class TokenFlowError(Exception):
    """Base class for errors caused by user input (a bad file, option or model id)."""


class InputError(TokenFlowError, ValueError):
    """A video, folder or option value that cannot be used; the message names it and says what to do."""


class ModelLoadError(TokenFlowError):
    """A model that cannot be found or loaded; the message says how to fix it."""


class NumericalError(TokenFlowError):
    """NaN or inf in latents or decoded frames (float16 overflowed): refused rather than written as a black video;
    the message names the dtype option to change."""
