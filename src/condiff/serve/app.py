"""The page of ``condiff serve``: a Gradio app over :mod:`condiff.serve.request`.

The page only collects a :class:`~condiff.serve.request.Request`, calls
:func:`~condiff.serve.request.run` and shows what comes back; it has no logic of its own.
Nothing is fetched from outside at run time: analytics, the version check and share links
are off, and the theme uses the system's fonts (no font CDN).
"""

from __future__ import annotations

import html
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from ..errors import CondiffError
from .request import (LIMITS, MAX_IMAGES, MAX_STEPS, MAX_UPLOAD_BYTES, METHODS, Request, Result, run, save_result,
                      scale_labels, solvers)

__all__ = ["build_app", "serve", "QUEUE_SIZE"]

QUEUE_SIZE = 32   # requests waiting at most; one runs at a time (one model, results never mix)
KEEP_RESULTS = 16  # result folders kept on disk (the oldest are removed)
PREVIEW_EVERY_S = 0.2  # at most this often a new x0 preview is sent to the page

# before gradio is imported: no telemetry, no hub calls
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise CondiffError("condiff serve needs the web extra: pip install 'condiff[serve]'") from None
    return gr


def _theme(gr):
    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def _upscaled(x, k: int = 4):
    """A square-ish uint8 grid of ``x`` (N, C, H, W), each pixel k x k, for the page."""
    import numpy as np

    from ..images import make_grid

    grid = make_grid(x).repeat(k, 0).repeat(k, 1)
    return grid[..., 0] if grid.shape[-1] == 1 else np.ascontiguousarray(grid)


def _bar(done: int, total: int, note: str = "") -> str:
    return (f'<div id="condiff-progress"><progress value="{done}" max="{total}"></progress> '
            f'step {done} / {total} {html.escape(note)}</div>')


def _error(message: str) -> str:
    return f'<div id="condiff-error" style="color:#b00020;font-weight:600">error: {html.escape(message)}</div>'


class _Results:
    """One folder per request under a private temp folder; only the newest KEEP_RESULTS are kept."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="condiff-serve-"))
        self.lock = threading.Lock()

    def new(self) -> Path:
        with self.lock:
            folders = sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime)
            for old in folders[:max(0, len(folders) - KEEP_RESULTS + 1)]:
                shutil.rmtree(old, ignore_errors=True)
            return Path(tempfile.mkdtemp(dir=self.root))


def _summary(result: Result) -> str:
    r = result.request
    what = ", ".join(METHODS[m] for m in r.methods) or "unguided"
    lines = [f"**{r.n} images** ({what}) in **{result.seconds:.2f} s**"
             + (f"; first preview after {result.first_preview_s:.2f} s" if result.first_preview_s else "")]
    if result.strip is not None:
        columns = " | ".join(scale_labels(r, result.strip_factors))
        lines.append(f"Scale strip: rows are the first {len(result.strip) // len(result.strip_factors)} seeds, "
                     f"columns every scale times {', '.join(f'{f:g}' for f in result.strip_factors)}: {columns}")
    if result.warning:
        lines.append(f"**Warning:** {result.warning}")
    return "\n\n".join(lines)


def build_app(models):
    """The Gradio Blocks of the page for loaded :class:`~condiff.serve.request.Models`."""
    from ..compose import solver_options

    gr = _gradio()
    results = _Results()
    eta_solvers = ", ".join(k for k in solvers() if "eta" in solver_options(k))
    available = models.available()
    names = models.class_names
    default_class = "Sneaker" if "Sneaker" in names else (names[0] if names else None)
    choices = [(label + ("" if available[m] else " (not loaded)"), m) for m, label in METHODS.items()]

    with gr.Blocks(title="condiff serve", analytics_enabled=False, delete_cache=(600, 1800)) as app:
        gr.Markdown("# condiff: conditional control of a diffusion model\n"
                    "Choose guidance methods (none is unguided sampling), press **Generate**, and watch the "
                    "x0 prediction form. The scale strip shows the same seeds at several scales.")
        with gr.Row():
            with gr.Column(scale=1):
                methods = gr.CheckboxGroup(choices, value=["cfg"] if available["cfg"] else [],
                                           label="Methods (none selected = unguided)", elem_id="methods")
                class_name = gr.Dropdown(names, value=default_class, label="Class (CFG and classifier guidance)",
                                         elem_id="class", allow_custom_value=not names)
                prompt = gr.Textbox(label="Text prompt", placeholder="a pair of running shoes", elem_id="prompt")
                # near the top, beside the preview: the progress bar and errors stay in view while sampling
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.HTML(elem_id="status")
                with gr.Row():
                    reference = gr.File(label="Reference image", type="filepath", elem_id="reference")
                    style = gr.File(label="Style image", type="filepath", elem_id="style")
                defaults = Request()
                sliders = {}
                labels = {"cfg_w": "CFG weight w (eq 24)", "classifier_scale": "classifier scale gamma (eq 8)",
                          "text_scale": "text scale", "image_scale": "reference-image scale",
                          "style_scale": "style scale"}
                for key, label in labels.items():
                    lo, hi = LIMITS[key]
                    sliders[key] = gr.Slider(lo, hi, value=getattr(defaults, key), label=label,
                                             elem_id=key.replace("_", "-"))
                with gr.Row():
                    sampler = gr.Dropdown(solvers(), value=defaults.sampler, label="Sampler", elem_id="sampler")
                    steps = gr.Slider(1, MAX_STEPS, value=defaults.steps, step=1, label="Steps", elem_id="steps")
                    eta = gr.Slider(*LIMITS["eta"], value=defaults.eta, label=f"eta ({eta_solvers})", elem_id="eta")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    n = gr.Slider(1, MAX_IMAGES, value=defaults.n, step=1, label="Images", elem_id="n")
                    strip_on = gr.Checkbox(value=True, label="Scale strip", elem_id="strip-on")
            with gr.Column(scale=1):
                preview = gr.Image(label="x0 prediction while denoising", format="png", interactive=False,
                                   elem_id="preview")
                grid = gr.Image(label="Samples", format="png", interactive=False, elem_id="grid")
                strip = gr.Image(label="Scale strip", format="png", interactive=False, elem_id="strip")
                summary = gr.Markdown(elem_id="summary")
                command = gr.Textbox(label="The same grid from the command line", interactive=False,
                                     buttons=["copy"], elem_id="command")
                files = gr.File(label="Downloads (PNG grid, .npz)", file_count="multiple", interactive=False,
                                elem_id="downloads")

        inputs = [methods, class_name, prompt, reference, style, *sliders.values(), sampler, steps, eta, seed, n,
                  strip_on]
        outputs = [status, preview, grid, strip, summary, command, files]

        def generate(methods, class_name, prompt, reference, style, cfg_w, classifier_scale, text_scale,
                     image_scale, style_scale, sampler, steps, eta, seed, n, strip_on):
            req = Request(tuple(methods or ()), class_name, prompt or "", reference, style, cfg_w, classifier_scale,
                          text_scale, image_scale, style_scale, sampler, steps, eta, seed, n, strip_on)
            yield from _stream(models, req, results, gr.skip(), lambda message: gr.Warning(f"error: {message}"))

        button.click(generate, inputs, outputs, api_name="generate", concurrency_limit=1,
                     show_progress="hidden")
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return app


def _stream(models, req, results, skip, warn=lambda message: None):
    """Run ``req`` in a worker thread; yield (status, preview, grid, strip, summary, command, files) updates."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    class Stopped(Exception):
        pass

    def progress(done, total, x0):
        if stop.is_set():  # the page went away: stop sampling
            raise Stopped
        events.put(("step", (done, total, x0)))

    def work():
        try:
            events.put(("done", run(models, req, progress)))
        except Stopped:
            pass
        except CondiffError as e:
            events.put(("error", str(e)))
        except Exception as e:  # a bug: the message in the page, the traceback in the log, the server lives
            traceback.print_exc(file=sys.stderr)
            events.put(("error", f"internal error ({type(e).__name__}: {e})"))

    yield '<div id="condiff-progress">starting</div>', None, None, None, "", "", None
    worker = threading.Thread(target=work, daemon=True, name="condiff-serve-request")
    worker.start()
    last = 0.0
    try:
        while True:
            kind, payload = events.get()
            if kind == "step":
                while not events.empty() and events.queue[0][0] == "step":  # keep only the newest preview
                    kind, payload = events.get()
                done, total, x0 = payload
                now = time.perf_counter()
                if now - last >= PREVIEW_EVERY_S or done == total or done == 1:
                    last = now
                    yield _bar(done, total), _upscaled(x0), skip, skip, skip, skip, skip
                continue
            if kind == "error":
                warn(payload)  # also a notice at the top of the page, wherever it is scrolled
                yield _error(payload), None, None, None, "", "", None
                return
            result = payload
            folder = results.new()
            paths = save_result(result, folder)
            total = result.request.steps * (1 + len(result.strip_factors))
            yield (_bar(total, total, f"done in {result.seconds:.2f} s"), _upscaled(result.images),
                   _upscaled(result.images), str(paths["strip"]) if "strip" in paths else None,
                   _summary(result), result.command, [str(paths["png"]), str(paths["npz"])])
            return
    finally:
        stop.set()


def serve(models, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True):
    """Start the page on http://host:port; returns the Gradio app (``block=False``: serve in the background)."""
    gr = _gradio()
    app = build_app(models)
    try:
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, pwa=False,
                   mcp_server=False, enable_monitoring=False, max_file_size=MAX_UPLOAD_BYTES, quiet=False,
                   footer_links=["api"], theme=_theme(gr), prevent_thread_lock=not block, show_error=True)
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise CondiffError(f"cannot listen on {host}:{port} ({str(e).split('. ')[0]}); choose another --port "
                           "or --host") from None
    return app
