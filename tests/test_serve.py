"""``condiff serve``: the request layer, the page in headless Chromium (Selenium), and a load test over HTTP.

The server runs as ``python -m condiff serve`` on a free port of 127.0.0.1; the browser is Debian's
``chromium`` driven through ``/usr/bin/chromedriver`` (scripts/setup.sh installs both; nothing is
downloaded at run time: Selenium Manager never runs because the driver path is given).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.errors import CondiffError
from condiff.images import to_uint8
from condiff.serve import MAX_IMAGES, MAX_UPLOAD_BYTES, Request, load_models, run, validate
from helpers import one_thread, run_cli_inprocess  # noqa: F401 (autouse fixture)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REFERENCE = Path(__file__).parents[1] / "src" / "condiff" / "models" / "references" / "dress.png"
FAST = dict(steps=5, n=3)  # a few steps of the shipped model: about 0.1 s per image on one thread


@pytest.fixture(scope="module")
def models():
    return load_models(text=False, device="cpu")


# ----------------------------------------------------------------------------- the request layer
def test_bad_requests_are_one_line_errors(models, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image\n")
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(MAX_UPLOAD_BYTES + 1)
    with_text = replace(models, text_encoder=object(), text_model=object())  # validation never calls them
    cases = [
        (Request(("cfg",), "Sneaker", cfg_w=25.0), "cfg w must lie in [0, 20]"),
        (Request(("classifier",), "Sneaker", classifier_scale=float("nan")), "classifier scale must lie"),
        (Request(("cfg",), "Sneaker", n=MAX_IMAGES + 1), f"number of images must lie in [1, {MAX_IMAGES}]"),
        (Request(("cfg",), "Sneaker", steps=0), "steps must lie"),
        (Request(("cfg",), "Sneaker", seed=1.5), "seed must be a whole number"),
        (Request(("cfg",), "Sneaker", sampler="euler-nope"), "unknown sampler"),
        (Request(("cfg",), "Sandwich"), "unknown class 'Sandwich'"),
        (Request(("cfg",), None), "choose a class"),
        (Request(("warp",)), "unknown method 'warp'"),
        (Request(("text",), prompt="a shoe"), "text prompt (eq 15) is not available on this server"),
        (Request(("image",), reference=str(text_file)), "not a readable image"),
        (Request(("style",), style=str(huge)), "the file is too large"),
        (Request(("image",), reference=None), "reference image: upload an image first"),
    ]
    for req, message in cases:
        with pytest.raises(CondiffError, match=None) as e:
            validate(req, models)
        assert message in str(e.value) and "\n" not in str(e.value), (req, str(e.value))
    with pytest.raises(CondiffError, match="the text prompt is empty"):
        validate(Request(("text",), prompt="   \n"), with_text)
    with pytest.raises(CondiffError, match="too long"):
        validate(Request(("text",), prompt="shoe " * 100), with_text)


@pytest.mark.parametrize("methods,sampler,eta", [(("cfg", "classifier", "image"), "ddpm", 0.0),
                                                 (("style",), "euler-ancestral", 0.5)])
def test_request_equals_the_command_line_it_prints(models, tmp_path, monkeypatch, methods, sampler, eta):
    """The page's command line makes the same images as the page (any methods, any solver)."""
    req = Request(methods, "dress", reference=str(REFERENCE), style=str(REFERENCE), cfg_w=1.5, classifier_scale=2.0,
                  image_scale=50.0, style_scale=20.0, sampler=sampler, eta=eta, strip=False, seed=7, **FAST)
    seen = []
    result = run(models, req, lambda done, total, x0: seen.append((done, total, tuple(x0.shape))))
    assert [s[0] for s in seen] == list(range(1, FAST["steps"] + 1)) and seen[0][1:] == (FAST["steps"], (3, 1, 28, 28))
    assert result.strip is None
    if "cfg" in methods:
        assert result.request.class_name == "Dress" and result.labels.tolist() == [3] * 3
    argv = shlex.split(result.command)
    flag = "--image" if "image" in methods else "--style"
    assert argv[:2] == ["condiff", "sample"] and argv[argv.index(flag) + 1] == "dress.png"
    assert ("--eta" in argv) == (sampler == "euler-ancestral")  # ddpm takes no eta; 0.5 is not euler-a's default
    assert sampler != "euler-ancestral" or argv[argv.index("--eta") + 1] == "0.5"
    (tmp_path / "dress.png").write_bytes(REFERENCE.read_bytes())
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli_inprocess(argv[1:] + ["--no-progress"])
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "samples.npz")["images"], to_uint8(result.images))


def test_scale_strip_is_the_same_seeds_at_scaled_guidance(models):
    req = Request(("cfg",), "Trouser", cfg_w=3.0, seed=2, steps=4, n=2)
    result = run(models, req)
    k, F = 2, len(result.strip_factors)
    assert result.strip_factors == (0.0, 0.5, 1.0, 2.0) and result.strip.shape == (k * F, 1, 28, 28)
    strip = result.strip.view(k, F, 1, 28, 28)
    assert torch.equal(strip[:, 2], result.images[:k])  # factor 1 is the request itself (DDIM: deterministic)
    w0 = run(models, replace(req, cfg_w=0.0, strip=False)).images  # factor 0: w = 0, plain conditional
    assert torch.equal(strip[:, 0], w0)
    assert not torch.equal(strip[:, 0], strip[:, 3])
    from condiff.serve.request import scale_labels

    assert scale_labels(replace(req, methods=("cfg", "image"), image_scale=50.0), result.strip_factors) == \
        ["w 0, image 0", "w 1.5, image 25", "w 3, image 50", "w 6, image 100"]


# ----------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``condiff serve`` in a subprocess on 127.0.0.1 (one thread, no text model); yields its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "condiff", "serve", "--no-text", "--device", "cpu",
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    try:
        while True:
            assert proc.poll() is None, f"condiff serve exited: {log.read_text()}"
            try:
                with urllib.request.urlopen(url + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.perf_counter() - t0 < 90, f"condiff serve did not answer in 90 s: {log.read_text()}"
            time.sleep(0.3)
        yield {"url": url, "proc": proc, "log": log, "start_s": time.perf_counter() - t0}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -15), log.read_text()


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _get(url: str) -> bytes:
    assert url.startswith("http://127.0.0.1:"), url  # never an outside address
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def _call(base: str, req: Request, timeout: float = 120) -> tuple[str, object]:
    """One generate call over Gradio's HTTP API: ("complete", outputs) or ("error", Gradio's message)."""
    data = [list(req.methods), req.class_name, req.prompt, None, None, req.cfg_w, req.classifier_scale,
            req.text_scale, req.image_scale, req.style_scale, req.sampler, req.steps, req.eta, req.seed, req.n,
            req.strip]
    post = urllib.request.Request(base + "/gradio_api/call/generate", json.dumps({"data": data}).encode(),
                                  {"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as r:
        event_id = json.load(r)["event_id"]
    event, last = None, None
    with urllib.request.urlopen(f"{base}/gradio_api/call/generate/{event_id}", timeout=timeout) as r:
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                last = (event, json.loads(line.split(":", 1)[1]))
                break
    assert last is not None, "the event stream ended without a result"
    return last


def _api(base: str, req: Request, timeout: float = 120) -> list:
    """The final outputs (status, preview, grid, strip, summary, command, files) of one generate call."""
    event, out = _call(base, req, timeout)
    assert event == "complete", out
    return out


def _npz_images(base: str, files: list) -> np.ndarray:
    (npz,) = [f for f in files if f["path"].endswith(".npz")]
    return np.load(io.BytesIO(_get(npz["url"] if npz["url"].startswith("http") else base + npz["url"])))["images"]


def test_load_eight_concurrent_requests_are_each_bit_identical_to_one_alone(server, models, record_property):
    reqs = [Request(("cfg",), "Bag", seed=100 + i, steps=4, n=2, strip=False) for i in range(8)]
    alone = {r.seed: to_uint8(run(models, r).images) for r in reqs}  # the library, one request at a time
    t0 = time.perf_counter()
    one = _api(server["url"], reqs[0])
    t_one = time.perf_counter() - t0
    outputs, times, errors = {}, {}, []

    def client(r):
        try:
            t = time.perf_counter()
            outputs[r.seed] = _api(server["url"], r)
            times[r.seed] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(r,)) for r in reqs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0
    assert not errors and len(outputs) == 8, errors
    assert np.array_equal(_npz_images(server["url"], one[-1]), alone[reqs[0].seed])
    for r in reqs:
        got = _npz_images(server["url"], outputs[r.seed][-1])
        assert np.array_equal(got, alone[r.seed]), f"seed {r.seed}: the server's images differ from the library's"
        assert f"--seed {r.seed} " in outputs[r.seed][5]
    assert len({a.tobytes() for a in alone.values()}) == 8  # different seeds, different images
    record_property("figures", f"1 client {t_one:.2f} s; 8 concurrent: all done in {wall:.2f} s, per request "
                               f"{min(times.values()):.2f}-{max(times.values()):.2f} s; server peak RSS "
                               f"{_peak_rss_mib(server['proc'].pid):.0f} MiB")


def test_bad_input_over_http_is_a_message_and_the_server_keeps_running(server):
    # out of the sliders' ranges: Gradio's own check answers first (the page shows it as an error box)
    event, out = _call(server["url"], Request(("cfg",), "Sneaker", cfg_w=1e6, **FAST))
    assert event == "error" and "greater than maximum value 20" in out["error"], out
    event, out = _call(server["url"], Request(("cfg",), "Sneaker", n=10_000, steps=2))
    assert event == "error" and "greater than maximum value 64" in out["error"], out
    # what the widgets cannot check: condiff's message in the page's status box
    out = _api(server["url"], Request(("text",), prompt="a shoe", **FAST))
    assert "condiff-error" in out[0] and "text prompt (eq 15) is not available" in out[0], out[0]
    out = _api(server["url"], Request(("image",), None, **FAST))
    assert "reference image: upload an image first" in out[0], out[0]
    # an upload over the limit is refused by the server before it reaches condiff
    boundary = "condiffboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"huge.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + b"\0" * (MAX_UPLOAD_BYTES + 1) + \
        f"\r\n--{boundary}--\r\n".encode()
    post = urllib.request.Request(server["url"] + "/gradio_api/upload", body,
                                  {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(post, timeout=60)
    assert e.value.code == 413 and "File size exceeded" in e.value.read().decode(), e.value
    out = _api(server["url"], Request((), None, steps=2, n=1, strip=False))  # still serving
    assert "condiff-error" not in out[0] and _npz_images(server["url"], out[-1]).shape == (1, 28, 28, 1)


# ----------------------------------------------------------------------------- the page in a real browser
@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):  # scripts/setup.sh installs Debian's chromium and chromium-driver
        assert Path(path).is_file(), f"{path} is missing: run scripts/setup.sh (apt-get install chromium " \
                                     "chromium-driver)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,2200",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                "--disable-sync", "--disable-extensions", "--disable-default-apps"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # a given driver: no Selenium Manager
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _act(action, tries: int = 20):
    """Run a find-and-act on the page again while Gradio re-renders the element under it."""
    from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException

    for i in range(tries):
        try:
            return action()
        except (StaleElementReferenceException, ElementClickInterceptedException):
            if i == tries - 1:
                raise
            time.sleep(0.1)


def _set_number(driver, elem_id: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def act():
        box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)

    _act(act)
    deadline = time.perf_counter() + 10
    while _read(driver, f"#{elem_id} input[type=number]", "value") != [str(value)]:
        assert time.perf_counter() < deadline, f"#{elem_id} did not take {value}"
        time.sleep(0.05)


def _toggle(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    _act(lambda: driver.find_element(By.XPATH, f"//fieldset[@id='methods']//label[contains(., '{label}')]").click())


def _upload(driver, elem_id: str, path: Path, timeout: float = 30) -> None:
    """Choose ``path`` in the file input of ``elem_id``; wait until the page lists the uploaded file."""
    from selenium.webdriver.common.by import By

    _act(lambda: driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path)))
    deadline = time.perf_counter() + timeout
    while not _read(driver, f"#{elem_id} a[download='{path.name}']", "href"):
        assert time.perf_counter() < deadline, f"the upload of {path.name} did not finish"
        time.sleep(0.1)


def _read(driver, selector: str, prop: str = "innerText") -> list:
    """``prop`` of every element matching ``selector``, read in one script (no stale references mid-render)."""
    return driver.execute_script("return Array.from(document.querySelectorAll(arguments[0]))"
                                 ".map(e => String(e[arguments[1]]))", selector, prop)


def _generate(driver, timeout: float = 120) -> tuple[float | None, float]:
    """Press Generate; wait for the downloads of a new result or an error. Returns (first preview s, total s)."""
    from selenium.webdriver.common.by import By

    old = set(_read(driver, "#downloads a", "href"))
    _act(lambda: driver.find_element(By.ID, "generate").click())
    t0, first = time.perf_counter(), None
    while time.perf_counter() - t0 < timeout:
        if first is None and _read(driver, "#preview img", "src"):
            first = time.perf_counter() - t0
        if _read(driver, "#condiff-error"):
            return first, time.perf_counter() - t0
        links = set(_read(driver, "#downloads a", "href"))
        if links and links != old and "done in" in "".join(_read(driver, "#status")):
            return first, time.perf_counter() - t0
        time.sleep(0.05)
    raise AssertionError(f"no result in {timeout} s: {_read(driver, '#status')}")


def _downloaded_npz(driver) -> np.ndarray:
    (href,) = [h for h in _read(driver, "#downloads a", "href") if ".npz" in h]
    return np.load(io.BytesIO(_get(href)))["images"]


def test_page_in_headless_chromium(server, browser, models, tmp_path, record_property):
    from selenium.webdriver.common.by import By

    t_test = time.perf_counter()
    browser.get(server["url"] + "/")
    deadline = time.perf_counter() + 60
    while not browser.find_elements(By.ID, "generate"):
        assert time.perf_counter() < deadline, "the page did not render"
        time.sleep(0.1)

    # 1. CFG "Sneaker" (the page's defaults: CFG checked, class Sneaker), a few steps
    _set_number(browser, "steps", 5)
    _set_number(browser, "n", 4)
    _set_number(browser, "seed", 11)
    first_preview, total = _generate(browser)
    assert first_preview is not None and first_preview < total, "no x0 preview was shown while denoising"
    expected = run(models, Request(("cfg",), "Sneaker", seed=11, steps=5, n=4, strip=False)).images
    assert np.array_equal(_downloaded_npz(browser), to_uint8(expected))
    (src,) = _read(browser, "#grid img", "src")
    grid = np.asarray(Image.open(io.BytesIO(_get(src))).convert("L"))
    from condiff.serve.app import _upscaled

    assert np.array_equal(grid, _upscaled(expected)), "the grid shown differs from the library's images"
    (strip,) = _read(browser, "#strip img", "src")
    assert Image.open(io.BytesIO(_get(strip))).size[0] > 0
    (command,) = _read(browser, "#command textarea", "value")
    from condiff.compose import DEFAULT_SCALES
    from condiff.serve import STRIP_FACTORS

    w = DEFAULT_SCALES["cfg"]  # the page's default, the library's
    assert command.startswith(f"condiff sample --class Sneaker --cfg-w {w:g} ") and "--seed 11" in command
    summary = "".join(_read(browser, "#summary"))
    strip = " | ".join(f"w {f * w:g}" for f in STRIP_FACTORS)  # w 0 | w 0.5 | w 1 | w 2
    assert "4 images" in summary and "Scale strip" in summary and strip in summary, summary
    assert _read(browser, "#condiff-progress progress", "value") == ["25"]  # 5 steps x (grid + 4 strip scales)

    # 2. add a reference image (CFG + reference-image guidance)
    _toggle(browser, "reference image")
    _upload(browser, "reference", REFERENCE)
    _generate(browser)
    assert not _read(browser, "#condiff-error"), _read(browser, "#status")
    expected = run(models, Request(("cfg", "image"), "Sneaker", reference=str(REFERENCE), seed=11, steps=5, n=4,
                                   strip=False)).images
    assert np.array_equal(_downloaded_npz(browser), to_uint8(expected))

    # 3. a text file as the style image: a clear message in the page
    _toggle(browser, "style image")
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    _upload(browser, "style", notes)
    _generate(browser)
    error = "".join(_read(browser, "#condiff-error"))
    assert "style image notes.txt: not a readable image" in error, error
    deadline = time.perf_counter() + 10  # and as a notice at the top of the page (Gradio's toast)
    while "".join(_read(browser, "body")).count("notes.txt: not a readable image") < 2:
        assert time.perf_counter() < deadline, "no notice of the error at the top of the page"
        time.sleep(0.1)

    # nothing the page loaded came from outside this machine
    urls = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    outside = sorted(u for u in urls if not u.startswith((server["url"], "data:", "blob:")))
    assert not outside, outside
    assert server["proc"].poll() is None
    record_property("figures", f"server start {server['start_s']:.1f} s; first x0 preview in the page "
                               f"{first_preview:.2f} s after Generate; browser test "
                               f"{time.perf_counter() - t_test:.1f} s")
