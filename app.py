"""PneuNet web app: upload a chest X-ray, get a verdict, a calibrated probability and a heatmap.

    python app.py            # serves on http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override)

Runs offline as a Hugging Face Space: no analytics, no share link, nothing fetched at start-up. The model
is loaded once, from ``$PNEUNET_CHECKPOINT`` or the shipped ``pneunet/weights/pneunet.safetensors``.
Uploads live in a private temporary folder and are deleted when the requests using them end (after a
grace of ``$PNEUNET_UPLOAD_GRACE_S``, default 30 s, because identical uploads share one file); result
images shown in the page are swept from it after 10 minutes; nothing about an image is logged.
Not a medical device; not for diagnosis.
"""

from __future__ import annotations

import atexit
import csv
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path

# Privacy and offline operation: these must be set before gradio (or huggingface_hub) is imported.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
UPLOAD_DIR = Path(tempfile.mkdtemp(prefix="pneunet-app-"))  # mode 0700: only this user can read uploads
os.environ["GRADIO_TEMP_DIR"] = str(UPLOAD_DIR)
atexit.register(shutil.rmtree, UPLOAD_DIR, ignore_errors=True)

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from pneunet.cli import lung_fields_note  # noqa: E402
from pneunet.gate import NotAnXrayError  # noqa: E402
from pneunet.lungs import LungFields  # noqa: E402
from pneunet.overlay import overlay_heatmap  # noqa: E402
from pneunet.predictor import Prediction, Predictor, default_checkpoint  # noqa: E402
from pneunet.preprocessing import InvalidImageError  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLES = sorted((HERE / "pneunet" / "examples").glob("*.jpeg"))
MAX_BATCH_FILES = 100
DISPLAY_SIDE = 1024  # longest side of the images sent back to the page (aspect ratio kept)
# Two requests at once keep both CPU cores busy without making each one slower (see docs/app_benchmark.md).
CONCURRENCY = int(os.environ.get("PNEUNET_APP_CONCURRENCY", "2"))
# Limits (see docs/reliability.md). Uploads above MAX_UPLOAD_MB are refused by the server before they are
# stored; images above MAX_PIXELS (pneunet.preprocessing) before their pixels are decoded. One image may
# take at most REQUEST_TIMEOUT_S seconds; after that the person gets an error and the server keeps serving.
MAX_UPLOAD_MB = int(os.environ.get("PNEUNET_MAX_UPLOAD_MB", "64"))
REQUEST_TIMEOUT_S = float(os.environ.get("PNEUNET_REQUEST_TIMEOUT_S", "60"))
TIMEOUT_MESSAGE = (f"Analysing this file took longer than the {REQUEST_TIMEOUT_S:g} s limit, so it was stopped "
                   "and not analysed. Please try a smaller image (a chest X-ray needs no more than ~4000 px a side).")
INTERNAL_MESSAGE = "This file could not be analysed because of an internal error; it was not analysed. Please try another file."
_WORKERS = ThreadPoolExecutor(max_workers=2 * CONCURRENCY + 2, thread_name_prefix="analyse")


def _with_timeout(work, *args):
    """``work(*args)`` on a worker thread, giving up after REQUEST_TIMEOUT_S (the work itself runs on to
    its end, bounded by the size limits). Unexpected errors become a message without a traceback; their
    type (never the image or its metadata) goes to the log."""
    future = _WORKERS.submit(work, *args)
    try:
        return future.result(timeout=REQUEST_TIMEOUT_S)
    except FutureTimeout:
        raise gr.Error(TIMEOUT_MESSAGE) from None
    except (InvalidImageError, gr.Error):
        raise
    except Exception as error:  # a bug, or memory: never show a traceback to the person
        print(f"pneunet: internal error {type(error).__name__} while analysing an upload", flush=True)
        raise gr.Error(INTERNAL_MESSAGE) from None

CHECKPOINT = default_checkpoint()
PREDICTOR = Predictor.load(CHECKPOINT)
NORMAL_LABEL, PNEUMONIA_LABEL = PREDICTOR.config.labels
# A model with an evidence scale shows every image's map on that one scale; an old one scales each map to
# its own maximum (pneunet.heatmap.display_map / normalise_map), and the words and colour bar say which.
HEATMAP_SCALE = "fixed" if PREDICTOR.config.evidence_scale else "relative"


# ------------------------------------------------------------------------------ shipped evaluation


def _weights_file(name: str) -> Path | None:
    """A file shipped beside the checkpoint (REPORT.md, metrics.json), else beside the default one."""
    for folder in (CHECKPOINT.parent, HERE / "pneunet" / "weights"):
        if (folder / name).is_file():
            return folder / name
    return None


def operating_point() -> tuple[str, float, float] | None:
    """(where it was measured, sensitivity, specificity) at the model's threshold: the shipped test
    evaluation (metrics.json, written by ``python -m training.ship``), else the validation figures."""
    metrics_file = _weights_file("metrics.json")
    if metrics_file is not None:
        test = json.loads(metrics_file.read_text())["test"]
        return f"the shipped evaluation on the held-out test set ({test['n']} images)", test["sensitivity"], test["specificity"]
    val = PREDICTOR.config.provenance.get("val")
    if isinstance(val, dict) and "sensitivity" in val:
        return f"validation ({val.get('n', '?')} images)", val["sensitivity"], val["specificity"]
    return None


OPERATING_POINT = operating_point()


def threshold_meaning() -> str:
    threshold = PREDICTOR.config.threshold
    text = f"The model says *pneumonia* when the probability is at least **{threshold:.2f}**."
    if OPERATING_POINT:
        where, sensitivity, specificity = OPERATING_POINT
        text += (f" In {where} that threshold found **{sensitivity:.0%}** of the pneumonia X-rays (sensitivity) "
                 f"and cleared **{specificity:.0%}** of the normal ones (specificity): it is set to miss few "
                 "pneumonias, at the price of some false alarms.")
    return text


def about_markdown() -> str:
    report = _weights_file("REPORT.md")
    if report is not None:
        return report.read_text()
    return ("The shipped evaluation report (`pneunet/weights/REPORT.md`) is not in this copy of the app.\n\n"
            f"Model: `{PREDICTOR.config.architecture}`, input {PREDICTOR.config.image_size} px, "
            f"threshold {PREDICTOR.config.threshold:.3f}.\n\n"
            "Trained on paediatric (1-5 years) chest X-rays from a single centre (Kermany et al. 2018, CC BY 4.0). "
            "**Not a medical device; not for diagnosis.**")


# ------------------------------------------------------------------------------ request handling


class UploadJanitor:
    """Deletes Gradio's copies of uploads shortly after the last request using them ends.

    Gradio stores an upload under the sha256 of its content, so two requests with the same bytes share
    one file: deleting it the moment one request ends would break the other (still queued) one. Each
    file is therefore deleted ``grace_s`` seconds after its last user finished (never while in use);
    files outside the private folder, such as the bundled examples, are never touched."""

    def __init__(self, folder: Path, grace_s: float):
        self.folder, self.grace_s = folder.resolve(), grace_s
        self._users: dict[Path, int] = {}
        self._deadlines: dict[Path, float] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._sweep_forever, name="upload-janitor", daemon=True).start()

    def _own(self, path: str | None) -> Path | None:
        if not path:
            return None
        resolved = Path(path).resolve()
        return resolved if resolved.is_relative_to(self.folder) and resolved != self.folder else None

    @contextmanager
    def using(self, *paths: str | None):
        owned = [p for p in map(self._own, paths) if p is not None]
        with self._lock:
            for path in owned:
                self._users[path] = self._users.get(path, 0) + 1
                self._deadlines.pop(path, None)
        try:
            yield
        finally:
            with self._lock:
                for path in owned:
                    self._users[path] -= 1
                    if self._users[path] == 0:
                        del self._users[path]
                        self._deadlines[path] = time.monotonic() + self.grace_s

    def sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [path for path, deadline in self._deadlines.items() if deadline <= now]
            for path in expired:
                try:  # Gradio renames every upload into place, so the file's mtime is its latest upload
                    age = time.time() - path.stat().st_mtime
                except OSError:
                    age = float("inf")
                if age < self.grace_s:  # uploaded again since its last use ended: a queued request needs it
                    self._deadlines[path] = now + self.grace_s - age
                    continue
                del self._deadlines[path]
                path.unlink(missing_ok=True)
                if path.parent != self.folder and path.parent.is_dir() and not any(path.parent.iterdir()):
                    path.parent.rmdir()

    def sweep_empty_leftovers(self) -> None:
        """Gradio leaves one empty ``tmpXXXXXXXX`` file per upload in the folder; they hold no data but pile up."""
        cutoff = time.time() - self.grace_s
        for path in self.folder.glob("tmp*"):
            try:
                if path.is_file() and path.stat().st_size == 0 and path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
            except OSError:
                pass

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(min(1.0, self.grace_s))
            self.sweep()
            self.sweep_empty_leftovers()


JANITOR = UploadJanitor(UPLOAD_DIR, float(os.environ.get("PNEUNET_UPLOAD_GRACE_S", "30")))
GONE = "The uploaded file is no longer on the server (uploads are deleted right after use); please upload it again."


def _display(image: Image.Image, shrink: bool = True) -> Image.Image:
    """Shrink for the page (unless ``shrink`` is False: already shrunk), keeping the upload's own aspect ratio.

    Gradio caches a result image under the sha256 of its PNG bytes and rewrites that file in place for
    every request that produces the same bytes (the same X-ray sent twice): a client still downloading
    the first copy then gets a truncated response ("peer closed connection", docs/app_benchmark.md).
    A random PNG text chunk makes every result its own file; it also replaces any text metadata the
    upload carried, so none of it is echoed back."""
    image = image.copy()
    if shrink:
        image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.LANCZOS)
    image.info = {"pneunet-result": secrets.token_hex(8)}
    return image


def _analyse(path: str | None, targets: tuple[str, ...]) -> tuple[Prediction, Image.Image]:
    """Run the model on one uploaded file; every way it can fail becomes a ``gr.Error``."""
    if not path:
        raise gr.Error("Please upload a chest X-ray image first (JPEG, PNG or DICOM).")
    if not Path(path).is_file():
        raise gr.Error(GONE)

    def work():
        with JANITOR.using(path):
            prepared = PREDICTOR.prepare(path)
        return prepared, PREDICTOR.predict_inputs(prepared.model_input[None], heatmap=True, target=targets,
                                                  lungs=[prepared.lungs])[0]

    try:
        prepared, result = _with_timeout(work)
    except NotAnXrayError as error:
        raise gr.Error(f"This image was not analysed: {error}") from None
    except InvalidImageError as error:
        raise gr.Error(f"This file could not be read as an image: {error}") from None
    if result.refusal:
        raise gr.Error(f"This image was not analysed: {result.refusal}")
    return result, prepared.grey


def lungs_not_found_note(lungs: LungFields | None) -> str | None:
    """What the person must be told when the lung fields were not found (None when they were, or when
    the model does not look for them). It never means the image is not an X-ray: the input gate says that."""
    if lungs is None or lungs.plausible:
        return None
    return (f"PneuNet could not find both lung fields in this image ({lungs.reason}); the result was computed "
            "on a standard lung outline and is less reliable.")


def result_json(result: Prediction, target: str) -> dict:
    """The API's result. ``lung_fields_found`` is null for a model that does not look for lung fields;
    ``note`` is there only when they were not found. ``heatmap_scale``: "fixed" (the same evidence scale
    for every image) or "relative" (an old model's map, scaled to the image's own maximum)."""
    values = {"label": result.label, "pneumonia_probability": round(result.pneumonia_probability, 4),
              "threshold": round(result.threshold, 4), "heatmap_target": target, "heatmap_scale": HEATMAP_SCALE,
              "lung_fields_found": None if result.lungs is None else bool(result.lungs.plausible)}
    note = lungs_not_found_note(result.lungs)
    if note:
        values["note"] = note
    return values


def percent(probability: float) -> str:
    """A probability for people: never a flat 0 % or 100 %, which a calibrated model does not claim."""
    if probability >= 0.999:
        return "> 99.9%"
    if probability <= 0.001:
        return "< 0.1%"
    return f"{probability:.1%}"


def heatmap_meaning(result: Prediction) -> str:
    """What the heatmap means for this verdict. For a normal verdict the hottest spot is not a finding."""
    fixed = HEATMAP_SCALE == "fixed"
    if result.label == PNEUMONIA_LABEL:
        if fixed:
            return ("The heatmap shows where inside the lung fields the evidence for pneumonia sits, on a fixed "
                    "scale that is the same for every image: red is evidence as strong as the strongest region of "
                    "a typical pneumonia.")
        return ("The heatmap shows where in the image the evidence for pneumonia came from, scaled to this "
                "image's own strongest region (this model has no fixed scale).")
    if fixed:
        return ("There is no focal evidence for pneumonia. The heatmap is shown on the same fixed scale as for "
                "every image, so on a film like this one it stays cool; faint colour is weaker than what the "
                "model calls pneumonia and is not a finding.")
    return ("There is no focal evidence for pneumonia. This model scales every heatmap to the image's own "
            "strongest region, so its hottest spot is not a finding.")


def verdict_markdown(result: Prediction) -> str:
    if result.label == PNEUMONIA_LABEL:
        headline = "## Pneumonia suspected"
    else:
        headline = "## No pneumonia found"
    note = lungs_not_found_note(result.lungs)
    warning = f"**Lung fields not found.** {note}\n\n" if note else ""
    return (f"{headline}\n\n{warning}Calibrated pneumonia probability: **{percent(result.pneumonia_probability)}** "
            f"(threshold {result.threshold:.2f}).\n\n{threshold_meaning()}\n\n{heatmap_meaning(result)} "
            "*Screening aid for research: not a medical device, not for diagnosis.*")


def heatmap_overlay(result: Prediction, grey: Image.Image, target: str, colour_bar: bool = True) -> Image.Image:
    """The ``target`` heatmap and the lung outline over the upload, with a colour-bar panel on its right.
    Drawn on the upload as shown (at most DISPLAY_SIDE a side), so the image part has the original's shown
    size, and the outline and the words are sized for the page; the panel only adds width."""
    shown = grey.copy()
    shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.LANCZOS)
    return _display(overlay_heatmap(shown, result.heatmaps[target], result.lungs, colour_bar=colour_bar,
                                    scale=HEATMAP_SCALE, target=target), shrink=False)


def analyse_upload(path: str | None):
    """UI: verdict, original, pneumonia heatmap, normal heatmap, JSON."""
    result, grey = _analyse(path, ("pneumonia", "normal"))
    overlays = [heatmap_overlay(result, grey, t) for t in ("pneumonia", "normal")]
    return verdict_markdown(result), _display(grey), *overlays, result_json(result, "pneumonia")


def predict(path: str | None, target: str = "pneumonia"):
    """API ``/predict``: (JSON with label, pneumonia_probability, threshold, lung_fields_found; heatmap
    overlay image). The overlay has no colour-bar panel, so its pixels match the upload's (shrunk to at
    most DISPLAY_SIDE, aspect ratio kept); ``heatmap_scale`` in the JSON says what its colours mean."""
    if target not in ("pneumonia", "normal"):
        raise gr.Error("target must be 'pneumonia' or 'normal'")
    result, grey = _analyse(path, (target,))
    return result_json(result, target), heatmap_overlay(result, grey, target, colour_bar=False)


def _predict_one(path: str) -> Prediction:
    """The batch tab's model call: no heatmap, but the lung fields the model saw."""
    prepared = PREDICTOR.prepare(path)
    return PREDICTOR.predict_inputs(prepared.model_input[None], lungs=[prepared.lungs])[0]


BATCH_HEADERS = ["file", "label", "pneumonia_probability", "threshold", "lung_fields", "error"]


def analyse_batch(paths: list[str] | None):
    """Batch tab: a results table and a CSV to download (no heatmaps; whether the lung fields were found)."""
    paths = paths or []
    if not paths:
        raise gr.Error("Please upload one or more chest X-ray images.")
    if len(paths) > MAX_BATCH_FILES:
        raise gr.Error(f"{len(paths)} files is more than the {MAX_BATCH_FILES} a batch can hold; split them up.")
    rows = []
    with JANITOR.using(*paths):
        for path in paths:
            name = Path(path).name
            try:
                result = _with_timeout(_predict_one, path)
                error = result.refusal or ""
            except InvalidImageError as exception:
                result, error = None, str(exception)
            except gr.Error as exception:  # timeout or internal error: that file only
                result, error = None, exception.message
            if result is None or error:
                rows.append([name, "", None, round(PREDICTOR.config.threshold, 4), "", error])
            else:
                rows.append([name, result.label, round(result.pneumonia_probability, 4), round(result.threshold, 4),
                             lung_fields_note(result.lungs), ""])
    headers = BATCH_HEADERS
    # The CSV is a result, not an upload: it sits in the private folder until the cache sweep removes it.
    csv_path = Path(tempfile.mkdtemp(dir=UPLOAD_DIR)) / "pneunet_results.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(rows)
    return gr.Dataframe(value=rows, headers=headers), str(csv_path)


# ------------------------------------------------------------------------------ page

with gr.Blocks(title="PneuNet: pneumonia screening on chest X-rays", delete_cache=(60, 600)) as demo:
    gr.Markdown("# PneuNet\nPneumonia screening on chest X-rays, with a heatmap of where the model looked. "
                "**Research tool: not a medical device, not for diagnosis.** Uploads are deleted after each request.")
    with gr.Tab("Single image"):
        with gr.Row():
            with gr.Column(scale=1):
                # Any file type is accepted and judged by PneuNet's decoder, so an unsupported one gets our
                # message (and is deleted after its request) rather than Gradio's refusal before any request.
                upload = gr.File(label="Chest X-ray (JPEG, PNG 8/16-bit, TIFF, DICOM)", type="filepath", elem_id="upload")
                verdict = gr.Markdown(elem_id="verdict")
                raw = gr.JSON(label="Result (JSON)", elem_id="result-json")
            with gr.Column(scale=2):
                with gr.Row():
                    original = gr.Image(label="Original", type="pil", format="png", interactive=False, elem_id="original")
                    with gr.Tabs():
                        with gr.Tab("Heatmap: pneumonia"):
                            heat_pneumonia = gr.Image(label="Evidence for pneumonia", type="pil", format="png",
                                                      interactive=False, elem_id="heatmap")
                        with gr.Tab("Heatmap: normal"):
                            heat_normal = gr.Image(label="Evidence for normal", type="pil", format="png",
                                                   interactive=False, elem_id="heatmap-normal")
        outputs = [verdict, original, heat_pneumonia, heat_normal, raw]
        upload.upload(analyse_upload, upload, outputs, api_visibility="private")
        if EXAMPLES:
            gr.Examples([[str(path)] for path in EXAMPLES], inputs=upload, outputs=outputs, fn=analyse_upload,
                        run_on_click=True, cache_examples=False,
                        label="Examples: test-set X-rays from Kermany et al. 2018 (CC BY 4.0, see pneunet/examples/ATTRIBUTION.md)")
    with gr.Tab("Batch"):
        batch_files = gr.File(label="Chest X-rays", file_count="multiple", type="filepath")
        batch_button = gr.Button("Analyse all", variant="primary")
        batch_table = gr.Dataframe(headers=BATCH_HEADERS,
                                   interactive=False, label="Results")
        batch_csv = gr.File(label="Results as CSV", interactive=False)
        batch_button.click(analyse_batch, batch_files, [batch_table, batch_csv], api_name="predict_batch")
    with gr.Tab("About the model"):
        gr.Markdown(about_markdown())
    # The programmatic endpoint: invisible components, so the API returns exactly (JSON, heatmap image).
    with gr.Row(visible=False):
        api_file = gr.File(type="filepath", label="image")
        api_target = gr.Radio(["pneumonia", "normal"], value="pneumonia", label="heatmap target")
        api_json = gr.JSON(label="result")
        api_heatmap = gr.Image(type="pil", format="png", label="heatmap overlay")
        api_button = gr.Button("predict")
    api_button.click(predict, [api_file, api_target], [api_json, api_heatmap], api_name="predict")

demo.queue(default_concurrency_limit=CONCURRENCY, max_size=128)

LAUNCH_OPTIONS = dict(share=False, ssr_mode=False, max_file_size=f"{MAX_UPLOAD_MB}mb", show_error=False, footer_links=["api"])

if __name__ == "__main__":
    # SIGTERM (docker stop, systemd) ends the app like Ctrl-C, so the atexit clean-up removes the uploads folder.
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt))
    demo.launch(**LAUNCH_OPTIONS)
