"""``condiff serve``: a local web page over the library (the optional extra ``condiff[serve]``).

:mod:`condiff.serve.request` holds everything the page does (checked requests, the library
calls of ``condiff sample``, the equivalent command line) and imports no web library;
:mod:`condiff.serve.app` is the Gradio page that collects a request and shows the result.
"""

from .request import (LIMITS, MAX_IMAGES, MAX_UPLOAD_BYTES, METHODS, STRIP_FACTORS, Models, Request, Result,
                      command_line, load_models, run, save_result, validate)

__all__ = ["LIMITS", "MAX_IMAGES", "MAX_UPLOAD_BYTES", "METHODS", "STRIP_FACTORS", "Models", "Request", "Result",
           "command_line", "load_models", "run", "save_result", "validate"]
