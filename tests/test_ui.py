"""The web UI (``tokenflow ui``) end to end: the app served in-process on a free loopback port with the tiny random
model, driven by a real headless browser (Debian's chromium through Playwright) and by ``gradio_client`` against the
named endpoint ``/edit``; plus the demo setup and the command line.

Needs ``pip install -e '.[test]'`` (gradio, gradio_client, playwright) and ``apt-get install chromium``; nothing is
downloaded (Playwright's own browser download is not used). Missing pieces fail with the command to fix them.

Run as a script to write the README's screenshot (a real edit on the micro trained model when the checkout has it)::

    python tests/test_ui.py --screenshot docs/ui.png
"""

import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

try:
    import gradio
    import gradio_client  # noqa: F401
    import playwright.sync_api  # noqa: F401
except ImportError as exc:  # fail, never skip: CI must install them
    raise ImportError(f"{exc}; the UI tests need: pip install -e '.[test]' (gradio, gradio_client, playwright)") \
        from exc

from tokenflow.io import load_frames, probe
from tokenflow.testing import make_pan_clip

CHROMIUM = os.environ.get("TOKENFLOW_CHROMIUM", "/usr/bin/chromium")
FRAMES, WIDTH, HEIGHT = 6, 96, 64
RUN = dict(size="64", steps="2", inversion_steps="3")  # page fields for a quick tiny-model edit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frame_count(path: Path) -> int:
    return len(load_frames(path)[0])


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ui-clip") / "clip.mp4"
    make_pan_clip(path, num_frames=FRAMES, width=WIDTH, height=HEIGHT, shift=4, fps=12, audio=False)
    return path


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """The app on a free loopback port: (EditorApp, url)."""
    from tokenflow.ui import EditorApp, serve

    root = tmp_path_factory.mktemp("ui")
    app = EditorApp(tiny_model_dir, device="cpu", dtype="float32", out_dir=root / "runs", cache_dir=root / "cache")
    page = serve(app, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    try:
        yield app, page.local_url
    finally:
        page.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium: apt-get install -y chromium "
                    "(or set TOKENFLOW_CHROMIUM to a Chromium binary)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
    tab = context.new_page()
    tab.goto(served[1])
    tab.wait_for_selector("#tf-run")
    yield tab
    context.close()


def wait_text(page, selector: str, text: str, timeout: float = 60) -> str:
    page.wait_for_function("([s, t]) => { const e = document.querySelector(s); "
                           "return !!e && e.innerText.includes(t); }", arg=[selector, text], timeout=timeout * 1000)
    return page.inner_text(selector)


def toasts(page) -> str:
    return "\n".join(page.locator(".toast-body").all_inner_texts())


def upload(page, path: Path, expect: str = "Working size") -> str:
    clear = page.locator("#tf-video button[aria-label='Clear']")
    if clear.count():  # a video is loaded: the upload box comes back once it is cleared
        clear.first.click()
    page.locator("#tf-video input[type=file]").set_input_files(str(path))
    return wait_text(page, "#tf-info", expect)


def set_fields(page, prompt: str | None = None, **fields) -> None:
    if prompt is not None:
        page.fill("#tf-prompt textarea", prompt)
    for name, value in fields.items():
        page.fill(f"#tf-{name.replace('_', '-')} input", str(value))


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_browser_edit_plays_and_downloads(page, served, clip, tmp_path):
    app, _ = served
    info = upload(page, clip)
    assert f"{WIDTH}x{HEIGHT}, 12 fps" in info and f"{FRAMES} frames" in info and "Working size: 96x64" in info
    assert page.locator("#tf-first-frame img").count() == 1  # the first selected frame is shown
    set_fields(page, "a red car", **RUN)
    page.click("#tf-run")
    status = wait_text(page, "#tf-status", "Done")
    assert f"{FRAMES} frames at {WIDTH}x{HEIGHT}" in status

    # the result plays: a <video> with a duration, whose time advances
    played = page.evaluate("""async () => {
        const v = document.querySelector('#tf-edited video');
        const pause = ms => new Promise(r => setTimeout(r, ms));
        for (let i = 0; i < 100 && !(v.readyState >= 1 && v.duration > 0); i++) await pause(100);
        v.muted = true; v.currentTime = 0; await v.play();
        await pause(300);
        return [v.duration, v.currentTime];
    }""")
    assert played[0] > 0 and played[1] > 0, played
    assert page.locator("#tf-side video").count() == 1

    # downloads: edited.mp4 is a valid mp4 with every frame; run.json is the run's report
    with page.expect_download() as got:
        page.click("#tf-files a[download='edited.mp4']")
    video = tmp_path / "edited.mp4"
    got.value.save_as(video)
    info = probe(video)
    assert (info.width, info.height) == (WIDTH, HEIGHT) and frame_count(video) == FRAMES
    with page.expect_download() as got:
        page.click("#tf-files a[download='run.json']")
    got.value.save_as(tmp_path / "run.json")
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["prompt"] == "a red car" and report["output"]["frames"] == FRAMES

    # the run is in the gallery, and clicking it shows it again
    page.wait_for_function("document.querySelectorAll('#tf-gallery img').length >= 1", timeout=20000)
    page.locator("#tf-gallery button.thumbnail-item").first.click()
    wait_text(page, "#tf-status", "Showing an earlier result")
    assert "Traceback" not in page.content()


def test_browser_cancel_stops_and_writes_nothing(page, served, clip):
    app, _ = served
    upload(page, clip)
    # a long inversion, so the cancel lands midway
    set_fields(page, "a blue boat", size=64, steps=2, inversion_steps=999)  # the most a 1000-step model takes
    before = listing(app.out_root)
    page.click("#tf-run")
    progress = wait_text(page, "#tf-edited", "left", timeout=60)  # the live bar, with an ETA
    assert "Inverting the source" in progress
    page.click("#tf-cancel")
    status = wait_text(page, "#tf-status", "Cancelled", timeout=60)
    assert "nothing was written" in status
    assert listing(app.out_root) == before  # no run folder, no staging folder
    assert app.device_lock.acquire(blocking=False)  # the device is free again
    app.device_lock.release()

    # the app stays usable: the next run in the same tab finishes
    set_fields(page, inversion_steps=3)
    page.click("#tf-run")
    wait_text(page, "#tf-status", "Done")
    assert len(listing(app.out_root)) > len(before)


def test_browser_errors_in_plain_words(page, served, clip, tmp_path):
    app, _ = served
    if app.sample is not None:  # the bundled examples/pan.mp4 of a checkout
        page.click("#tf-sample")
        assert "32 frames" in wait_text(page, "#tf-info", "pan.mp4")
    seed = page.input_value("#tf-seed input")
    page.click("#tf-random-seed")
    page.wait_for_function("s => document.querySelector('#tf-seed input').value !== s", arg=seed, timeout=10000)
    upload(page, clip)
    set_fields(page, "", **RUN)  # empty prompt
    page.click("#tf-run")
    page.wait_for_function("document.body.innerText.includes('The prompt is empty')", timeout=30000)

    bad = tmp_path / "notes.mp4"
    bad.write_text("this is a text file, not a video\n")
    info = upload(page, bad, expect="Cannot use this video")
    assert "notes.mp4: not a readable video" in info
    assert "/tmp" not in info and "gradio" not in info  # the name the user knows, not the upload path
    set_fields(page, "a red car")
    page.click("#tf-run")
    page.wait_for_function("[...document.querySelectorAll('.toast-body')].filter(e => "
                           "e.innerText.includes('not a readable video')).length >= 2", timeout=30000)
    text = toasts(page)
    assert "check that it is an mp4/mov/webm/mkv/avi/gif file" in text
    assert "Traceback" not in page.content() and "InputError" not in text


def test_gradio_client_edit_endpoint(served, clip, monkeypatch, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    import tokenflow.runner as runner
    from tokenflow.editor import DEFAULT_NEGATIVE_PROMPT
    from tokenflow.runner import RunOptions

    app, url = served
    client = Client(url, verbose=False)
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/edit"]
    defaults = {p["parameter_name"]: p.get("parameter_default") for p in api["parameters"]}
    ref = RunOptions(video="")
    for name in ("steps", "inversion_steps", "guidance_scale", "batch_size", "mode", "propagation", "seed",
                 "negative_prompt", "size", "strength", "start", "stride", "max_frames"):
        assert defaults[name] == getattr(ref, name), name
    assert defaults["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT and "video" in defaults and "prompt" in defaults

    # two clients at once: the jobs take turns on the device (the queue's concurrency 1)
    active, most = [0], [0]
    guard = threading.Lock()
    real = runner.edit_video

    def counting(*args, **kwargs):
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(runner, "edit_video", counting)
    video = handle_file(str(clip))
    if int(gradio.__version__.split(".")[0]) < 6:
        video = {"video": video}  # Gradio 5's Video API takes {"video": file}
    kwargs = dict(video=video, size=64, steps=2, inversion_steps=3, api_name="/edit")
    jobs = [Client(url, verbose=False).submit(prompt=f"a {colour} car", **kwargs) for colour in ("red", "green")]
    results = [job.result(timeout=120) for job in jobs]
    assert most[0] == 1
    for result in results:
        edited, side, baseline, preview, files, metrics, report, status = result
        edited = edited["video"] if isinstance(edited, dict) else edited
        assert frame_count(Path(edited)) == FRAMES and probe(edited).width == WIDTH
        assert [Path(f).name for f in files] == ["edited.mp4", "run.json"]
        assert report["output"]["frames"] == FRAMES and "Done" in status
    # the second edit of the same video reused the cached inversion, and says so
    assert any("reused from the cache" in r[-1] for r in results) and any(r[6]["inversion_cache_hit"] for r in results)

    with pytest.raises(AppError, match="The prompt is empty"):
        client.predict(prompt="  ", **kwargs)
    with pytest.raises(AppError, match="Model /no/such/model: no such file or folder"):
        client.predict(prompt="a car", model="/no/such/model", **kwargs)
    assert "no/such" not in app.model_id  # a failed load keeps the loaded model

    # a cut file (lossless FFV1: its first frames decode whole) is refused, naming the page's switch; with the
    # switch on, the frames that decode are edited
    whole, cut = tmp_path / "whole.mkv", tmp_path / "cut.mkv"
    make_pan_clip(whole, num_frames=FRAMES, width=WIDTH, height=HEIGHT, shift=4, fps=12, audio=False)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    cut_video = handle_file(str(cut)) if int(gradio.__version__.split(".")[0]) >= 6 else {"video": handle_file(str(cut))}
    with pytest.raises(AppError, match="cut.mkv: truncated or damaged after frame .*“Use the frames that decode”"):
        client.predict(prompt="a car", **dict(kwargs, video=cut_video))
    partial = client.predict(prompt="a car", allow_partial=True, **dict(kwargs, video=cut_video))
    assert 1 <= partial[6]["output"]["frames"] < FRAMES and partial[6]["parameters"]["allow_partial"] is True

    # TokenFlow's fraction of steps (the model's default unless set; SD3/FLUX default to 0.1)
    assert defaults["propagation_t"] is None and results[0][6]["parameters"]["propagation_t"] is None
    fraction = client.predict(prompt="a car", propagation_t=0.5, **kwargs)
    assert fraction[6]["parameters"]["propagation_t"] == 0.5

    # another model named in the request replaces the loaded one (here the same folder through a link)
    original = app.model_id
    link = tmp_path / "other-model"
    link.symlink_to(original, target_is_directory=True)
    try:
        result = client.predict(prompt="a car", model=str(link), **kwargs)
        assert app.model_id == str(link) and result[6]["model"]["id"] == str(link)
    finally:
        client.predict(prompt="a car", model=original, **kwargs)
    assert app.model_id == original


def test_demo_setup_and_baseline(tmp_path):
    """``--demo``: the micro model and a clip made in its world, pre-filled prompts; the baseline comparison."""
    from tokenflow.ui import EditorApp, make_demo, metrics_table, repo_root

    if repo_root() is None or not (repo_root() / "benchmarks/micro_model/model").is_dir():
        pytest.fail("benchmarks/micro_model/model is missing from the checkout (vendored; needed by --demo)")
    demo = make_demo(tmp_path / "demo", frames=6)
    assert frame_count(demo.clip) == 6 and probe(demo.clip).width == 96
    assert demo.values["negative_prompt"] == "" and demo.values["inversion_prompt"] == demo.caption
    assert demo.values["prompt"] in demo.prompts and demo.values["size"] == 64
    app = EditorApp(demo.model, device="cpu", dtype="float32", out_dir=tmp_path / "runs", cache_dir=tmp_path / "c",
                    demo=demo)
    assert app.sample == demo.clip
    values = {**demo.values, "steps": 3, "inversion_steps": 3}
    outcome = app.run(dict(video=str(demo.clip), **values), baseline=True)
    assert outcome.baseline is not None and outcome.baseline.report["parameters"]["propagation"] == "none"
    assert Path(outcome.baseline.out_dir).parent == outcome.out_dir
    assert outcome.baseline.cache_hit  # the baseline reuses the TokenFlow run's inversion
    table = metrics_table(outcome)
    assert "per-frame baseline" in table and "Warp error ratio" in table
    assert app.gallery()[0][0].endswith("preview.png")


def test_demo_without_checkout_is_one_line(monkeypatch, tmp_path, capsys):
    import tokenflow.ui as ui
    from tokenflow.cli import main

    monkeypatch.setattr(ui, "_CHECKOUT", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["ui", "--demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "benchmarks/micro_model" in err and "source checkout" in err


def test_plain_message():
    from tokenflow.errors import InputError
    from tokenflow.ui import plain_message

    exc = InputError("/tmp/gradio/abc/clip.mp4: `start` 9 is past the last frame (6 frames); choose a smaller `start`")
    assert plain_message(exc, {"/tmp/gradio/abc/clip.mp4": "clip.mp4"}) == (
        "clip.mp4: Start frame 9 is past the last frame (6 frames); choose a smaller Start frame")


# ----------------------------------------------------------------------------- the README's screenshot


def _screenshot(out: Path) -> None:
    """Serve the app (the micro model in demo mode when the checkout has it, else a tiny random model), run one
    edit in the browser and save the finished page."""
    import tempfile

    import torch
    from playwright.sync_api import sync_playwright

    from tokenflow.ui import EditorApp, make_demo, repo_root, serve

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    work = Path(tempfile.mkdtemp(prefix="tokenflow-shot-"))
    if repo_root() is not None and (repo_root() / "benchmarks/micro_model/model").is_dir():
        demo = make_demo(work)
        app = EditorApp(demo.model, device="cpu", out_dir=work / "runs", cache_dir=work / "cache", demo=demo)
        clip, fields = demo.clip, {}
    else:
        from tokenflow.testing import build_tiny_sd

        app = EditorApp(build_tiny_sd(work / "tiny"), device="cpu", out_dir=work / "runs", cache_dir=work / "cache")
        clip = work / "clip.mp4"
        make_pan_clip(clip, num_frames=FRAMES, width=144, height=96, shift=4, fps=12, audio=False)
        fields = dict(RUN)
    served = serve(app, port=free_port(), block=False, quiet=True)
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            tab = b.new_page(viewport={"width": 1500, "height": 1100})
            tab.goto(served.local_url)
            tab.wait_for_selector("#tf-run")
            if app.demo is None:
                upload(tab, clip)
                set_fields(tab, "a red car", **fields)
            else:
                wait_text(tab, "#tf-info", "Working size")
                tab.check("#tf-evaluate input")
            started = time.time()
            tab.click("#tf-run")
            wait_text(tab, "#tf-status", "Done", timeout=900)
            tab.wait_for_function("document.querySelectorAll('#tf-gallery img').length >= 1", timeout=30000)
            tab.wait_for_timeout(1500)
            out.parent.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(out), full_page=True)
            print(f"edit took {time.time() - started:.0f} s; wrote {out}")
            b.close()
    finally:
        served.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--screenshot":
        sys.exit("usage: python tests/test_ui.py --screenshot docs/ui.png")
    _screenshot(Path(sys.argv[2]))


def test_the_app_edits_with_a_transformer_and_shows_its_working_size(tmp_path, pan_clip):
    """An SD3 folder in the model field: loaded through the same path, the working size it shows is the one the
    edit uses (whole 2x2 patches: multiples of 16), and the edit runs."""
    import json

    from tokenflow.testing import build_tiny_sd3
    from tokenflow.ui import EditorApp

    app = EditorApp(build_tiny_sd3(tmp_path / "sd3"), device="cpu", dtype="float32", out_dir=tmp_path / "runs",
                    cache_dir=tmp_path / "cache")
    assert "native size 64 px" in app.model_status()
    _, text = app.describe(pan_clip, size=72)
    outcome = app.run(dict(video=str(pan_clip), prompt="a robot", size=72, steps=2, inversion_steps=2, max_frames=4))
    out = json.loads((Path(outcome.out_dir) / "run.json").read_text())["output"]
    assert out["width"] % 16 == 0 and out["height"] % 16 == 0
    assert f"Working size: {out['width']}x{out['height']}" in text
