"""PneuNet web app: upload a chest X-ray, get a verdict, a calibrated probability and a heatmap.

    python app.py            # serves on http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override)

What a Hugging Face Space runs. ``main()`` loads the served model (``pneunet.backends.default_model``:
``$PNEUNET_MODEL``, or ``$PNEUNET_BACKEND=torch`` for the PyTorch checkpoint in development) and serves
``build_demo(predictor)``; importing this module does nothing (no model, no folder, no thread, no
environment change; gradio itself is imported only when a page is built).

Runs offline: the app forces ``GRADIO_ANALYTICS_ENABLED=False``, ``HF_HUB_OFFLINE=1`` and
``HF_HUB_DISABLE_TELEMETRY=1`` before gradio is imported, and never makes a share link. Uploads live in a
private folder (``GRADIO_TEMP_DIR``, mode 0700, removed at exit) and are deleted when the requests using
them end, after a grace of ``$PNEUNET_UPLOAD_GRACE_S`` (default 30 s, because identical uploads share one
file); result images shown in the page are swept after 10 minutes (``pneunet.uploads``). Nothing about an
image is logged: a refused upload is one log line saying why in general terms. Other settings:
``$PNEUNET_REQUEST_TIMEOUT_S`` (60), ``$PNEUNET_MAX_UPLOAD_MB`` (64), ``$PNEUNET_APP_CONCURRENCY`` (2).
Not a medical device; not for diagnosis.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from pneunet.cli import lung_fields_note
from pneunet.decision import format_probability
from pneunet.gate import NotAnXrayError
from pneunet.lungs import LungFields
from pneunet.model_card import model_card, operating_point, own_report, served_as
from pneunet.overlay import overlay_heatmap
from pneunet.predictor import Prediction, Predictor
from pneunet.preprocessing import InvalidImageError
from pneunet.uploads import InternalError, RequestTimeout, TimedWorkers, UploadJanitor, private_upload_folder

if TYPE_CHECKING:
    import gradio as gr

HERE = Path(__file__).resolve().parent
EXAMPLES = sorted((HERE / "pneunet" / "examples").glob("*.jpeg"))
# Set before gradio (and huggingface_hub, which reads them at import) is imported: no analytics, nothing
# fetched from the network. Forced rather than defaulted: the app promises this whatever the environment says.
PRIVACY_ENVIRONMENT = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
MAX_BATCH_FILES = 100
DISPLAY_SIDE = 1024  # longest side of the images sent back to the page (aspect ratio kept)
# Two requests at once keep both CPU cores busy without making each one slower (see docs/app_benchmark.md).
CONCURRENCY = int(os.environ.get("PNEUNET_APP_CONCURRENCY", "2"))
# Limits (see docs/reliability.md). Uploads above MAX_UPLOAD_MB are refused by the server before they are
# stored; images above MAX_PIXELS (pneunet.preprocessing) before their pixels are decoded. One image may
# take at most REQUEST_TIMEOUT_S seconds; after that the person gets a message and the server keeps serving.
MAX_UPLOAD_MB = int(os.environ.get("PNEUNET_MAX_UPLOAD_MB", "64"))
REQUEST_TIMEOUT_S = float(os.environ.get("PNEUNET_REQUEST_TIMEOUT_S", "60"))
UPLOAD_GRACE_S = float(os.environ.get("PNEUNET_UPLOAD_GRACE_S", "30"))
LAUNCH_OPTIONS = dict(share=False, ssr_mode=False, max_file_size=f"{MAX_UPLOAD_MB}mb", show_error=False, footer_links=["api"])

NO_FILE = "Please upload a chest X-ray image first (JPEG, PNG or DICOM)."
GONE = "The uploaded file is no longer on the server (uploads are deleted right after use); please upload it again."
INTERNAL_MESSAGE = "This file could not be analysed because of an internal error; it was not analysed. Please try another file."
BATCH_HEADERS = ["file", "label", "pneumonia_probability", "threshold", "lung_fields", "error", "operating_point", "warning"]
NOT_A_DEVICE = "*Screening aid for research: not a medical device, not for diagnosis.*"

log = logging.getLogger("pneunet.app")


def timeout_message(timeout_s: float) -> str:
    return (f"Analysing this file took longer than the {timeout_s:g} s limit, so it was stopped and not analysed. "
            "Please try a smaller image (a chest X-ray needs no more than ~4000 px a side).")


def import_gradio():
    """gradio, imported with PRIVACY_ENVIRONMENT in force."""
    os.environ.update(PRIVACY_ENVIRONMENT)
    import gradio

    return gradio


def api_error(message: str) -> "gr.Error":
    """The error an API caller gets: the message only; the refusal was already logged as one line."""
    return import_gradio().Error(message, print_exception=False)


class NotAnalysed(Exception):
    """Why one upload was not analysed, in words for the person who sent it."""


def lungs_not_found_note(lungs: LungFields | None) -> str | None:
    """What the person must be told when the lung fields were not found (None when they were, or when
    the model does not look for them). It never means the image is not an X-ray: the input gate says that."""
    if lungs is None or lungs.plausible:
        return None
    return (f"PneuNet could not find both lung fields in this image ({lungs.reason}); the result was computed "
            "on a standard lung outline and is less reliable.")


def shown_image(image: Image.Image, shrink: bool = True) -> Image.Image:
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


class AppService:
    """What the page and the API call, around one loaded predictor: the model's own report (for the
    figures shown), the upload janitor, the timed workers, and the folder results are written to.

    ``upload_folder`` must be where gradio stores uploads (``GRADIO_TEMP_DIR``; its default folder when
    None), since the janitor deletes only files inside it."""

    def __init__(self, predictor: Predictor, upload_folder: str | Path | None = None, *,
                 grace_s: float = UPLOAD_GRACE_S, timeout_s: float = REQUEST_TIMEOUT_S):
        self.predictor, self.config = predictor, predictor.config
        self.normal_label, self.pneumonia_label = predictor.config.labels
        # A model with an evidence scale shows every image's map on that one scale; an old one scales each map
        # to its own maximum (pneunet.heatmap), and the words and colour bar say which.
        self.heatmap_scale = "fixed" if predictor.config.evidence_scale else "relative"
        self.report = own_report(predictor.backend)  # None: this model has no figures of its own
        self.upload_folder = Path(upload_folder or import_gradio().utils.get_upload_folder())
        self.janitor = UploadJanitor(self.upload_folder, grace_s)
        self.workers = TimedWorkers(2 * CONCURRENCY + 2, timeout_s, passthrough=(InvalidImageError,))

    def close(self) -> None:
        self.janitor.stop()
        self.workers.close()

    # -------------------------------------------------------------------------- texts

    def about_markdown(self) -> str:
        return model_card(self.report, self.config, served_as(self.predictor.backend))

    def heatmap_meaning(self, result: Prediction) -> str:
        """What the heatmap means for this verdict. For a normal verdict the hottest spot is not a finding."""
        fixed = self.heatmap_scale == "fixed"
        if result.label == self.pneumonia_label:
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

    def verdict_markdown(self, result: Prediction) -> str:
        headline = "## Pneumonia suspected" if result.label == self.pneumonia_label else "## No pneumonia found"
        note = lungs_not_found_note(result.lungs)
        warning = f"**Lung fields not found.** {note}\n\n" if note else ""
        if result.warning:
            warning += f"**Unlike the training population.** {result.warning}\n\n"
        return (f"{headline}\n\n{warning}Calibrated pneumonia probability: **{format_probability(result.pneumonia_probability)}** "
                f"(threshold {format_probability(result.threshold)}).\n\n{self.operating_point_text(result)}\n\n"
                f"{self.heatmap_meaning(result)} {NOT_A_DEVICE}")

    def operating_point_text(self, result: Prediction) -> str:
        """What the threshold means: the shipped figures, or the site profile in force (whose probability and
        threshold were refitted on that site's films; the heatmap is the model's, unchanged)."""
        if result.operating_point == "shipped":
            return operating_point(self.report, self.config)
        return (f"Operating point: **{result.operating_point}**, not the shipped one: the probability and the "
                f"threshold were refitted on that site's labelled X-rays (the heatmap is unchanged).")

    @staticmethod
    def refusal_markdown(message: str) -> str:
        """The result area for an upload that was not analysed: the reason stays on the page."""
        return f"## Not analysed\n\n{message}\n\n{NOT_A_DEVICE}"

    def result_json(self, result: Prediction, target: str) -> dict:
        """The API's result. ``lung_fields_found`` is null for a model that does not look for lung fields;
        ``note`` is there only when they were not found. ``heatmap_scale``: "fixed" (the same evidence scale
        for every image) or "relative" (an old model's map, scaled to the image's own maximum)."""
        values = {"label": result.label, "pneumonia_probability": round(result.pneumonia_probability, 4),
                  "threshold": round(result.threshold, 4), "heatmap_target": target, "heatmap_scale": self.heatmap_scale,
                  "lung_fields_found": None if result.lungs is None else bool(result.lungs.plausible),
                  "operating_point": result.operating_point, "warning": result.warning}
        note = lungs_not_found_note(result.lungs)
        if note:
            values["note"] = note
        return values

    def heatmap_overlay(self, result: Prediction, grey: Image.Image, target: str, colour_bar: bool = True) -> Image.Image:
        """The ``target`` heatmap and the lung outline over the upload, with a colour-bar panel on its right.
        Drawn on the upload as shown (at most DISPLAY_SIDE a side), so the image part has the original's shown
        size, and the outline and the words are sized for the page; the panel only adds width."""
        shown = grey.copy()
        shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.LANCZOS)
        return shown_image(overlay_heatmap(shown, result.heatmaps[target], result.lungs, colour_bar=colour_bar,
                                           scale=self.heatmap_scale, target=target), shrink=False)

    # -------------------------------------------------------------------------- running the model

    def _run(self, work, path: str):
        """``work(path)`` on a timed worker; every expected way it fails becomes ``NotAnalysed``, logged as
        one line that says nothing about the image (an internal error's type is logged by the workers)."""
        try:
            return self.workers.run(work, path)
        except NotAnXrayError as error:
            log.info("upload not analysed: not a chest X-ray")
            raise NotAnalysed(f"This image was not analysed: {error}") from None
        except InvalidImageError as error:
            log.info("upload not analysed: not readable as an image")
            raise NotAnalysed(f"This file could not be read as an image: {error}") from None
        except RequestTimeout as error:
            log.info("upload not analysed: over the %g s time limit", error.timeout_s)
            raise NotAnalysed(timeout_message(error.timeout_s)) from None
        except InternalError:
            raise NotAnalysed(INTERNAL_MESSAGE) from None

    def _analyse(self, path: str | None, targets: tuple[str, ...]) -> tuple[Prediction, Image.Image]:
        """(prediction with the ``targets`` heatmaps, grey upload) for one uploaded file, or ``NotAnalysed``."""
        if not path:
            raise NotAnalysed(NO_FILE)
        if not Path(path).is_file():
            log.info("upload not analysed: the file was no longer on the server")
            raise NotAnalysed(GONE)

        def work(path: str):
            with self.janitor.using(path):
                prepared = self.predictor.prepare(path)
            result = self.predictor.predict_prepared([prepared], heatmap=True, target=targets)[0]
            return result, prepared.grey

        result, grey = self._run(work, path)
        if result.refusal:
            log.info("upload not analysed: not a chest X-ray")
            raise NotAnalysed(f"This image was not analysed: {result.refusal}")
        return result, grey

    def analyse_upload(self, path: str | None):
        """Single-image tab: verdict, original, pneumonia heatmap, normal heatmap, JSON. A file that is not
        analysed gets its reason in the verdict area, and the other outputs are cleared."""
        try:
            result, grey = self._analyse(path, ("pneumonia", "normal"))
        except NotAnalysed as refusal:
            return self.refusal_markdown(str(refusal)), None, None, None, None
        overlays = [self.heatmap_overlay(result, grey, target) for target in ("pneumonia", "normal")]
        return self.verdict_markdown(result), shown_image(grey), *overlays, self.result_json(result, "pneumonia")

    def predict(self, path: str | None, target: str = "pneumonia"):
        """API ``/predict``: (JSON with label, pneumonia_probability, threshold, lung_fields_found; heatmap
        overlay image). The overlay has no colour-bar panel, so its pixels match the upload's (shrunk to at
        most DISPLAY_SIDE, aspect ratio kept); ``heatmap_scale`` in the JSON says what its colours mean."""
        if target not in ("pneumonia", "normal"):
            raise api_error("target must be 'pneumonia' or 'normal'")
        try:
            result, grey = self._analyse(path, (target,))
        except NotAnalysed as refusal:
            raise api_error(str(refusal)) from None
        return self.result_json(result, target), self.heatmap_overlay(result, grey, target, colour_bar=False)

    def _predict_one(self, path: str) -> Prediction:
        """The batch tab's model call: no heatmap, but the lung fields the model saw."""
        return self.predictor.predict_prepared([self.predictor.prepare(path)])[0]

    def batch_rows(self, paths: list[str]) -> list[list[str]]:
        """One row per file (BATCH_HEADERS), probabilities as people read them; a file that was not analysed
        gets its reason in ``error`` and does not stop the others."""
        rows = []
        with self.janitor.using(*paths):
            for path in paths:
                name = Path(path).name
                try:
                    result = self._run(self._predict_one, path)
                    if result.refusal:
                        log.info("upload not analysed: not a chest X-ray")
                        raise NotAnalysed(result.refusal)
                except NotAnalysed as refusal:
                    rows.append([name, "", "", format_probability(self.predictor.threshold), "", str(refusal),
                                 self.predictor.operating_point, ""])
                    continue
                rows.append([name, result.label, format_probability(result.pneumonia_probability),
                             format_probability(result.threshold), lung_fields_note(result.lungs), "",
                             result.operating_point, result.warning or ""])
        return rows

    def analyse_batch(self, paths: list[str] | None):
        """Batch tab and API ``/predict_batch``: a results table and a CSV to download (no heatmaps; whether
        the lung fields were found)."""
        gr = import_gradio()
        paths = paths or []
        if not paths:
            raise api_error("Please upload one or more chest X-ray images.")
        if len(paths) > MAX_BATCH_FILES:
            raise api_error(f"{len(paths)} files is more than the {MAX_BATCH_FILES} a batch can hold; split them up.")
        rows = self.batch_rows(paths)
        # The CSV is a result, not an upload: it sits in the private folder until the cache sweep removes it.
        csv_path = Path(tempfile.mkdtemp(dir=self.upload_folder)) / "pneunet_results.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(BATCH_HEADERS)
            writer.writerows(rows)
        return gr.Dataframe(value=rows, headers=BATCH_HEADERS), str(csv_path)


# ------------------------------------------------------------------------------ page


def build_demo(predictor: Predictor, service: AppService | None = None) -> "gr.Blocks":
    """The Gradio page and API around an already-loaded predictor (``service``: the handlers, by default
    ``AppService(predictor)`` on gradio's upload folder). Starts the upload janitor; launches nothing."""
    gr = import_gradio()
    if service is None:
        service = AppService(predictor)
    elif service.predictor is not predictor:
        raise ValueError("build_demo: the service was built around another predictor")
    service.janitor.start()
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
            upload.upload(service.analyse_upload, upload, outputs, api_visibility="private")
            if EXAMPLES:
                gr.Examples([[str(path)] for path in EXAMPLES], inputs=upload, outputs=outputs, fn=service.analyse_upload,
                            run_on_click=True, cache_examples=False,
                            label="Examples: test-set X-rays from Kermany et al. 2018 (CC BY 4.0)")
        with gr.Tab("Batch"):
            batch_files = gr.File(label="Chest X-rays", file_count="multiple", type="filepath")
            batch_button = gr.Button("Analyse all", variant="primary")
            batch_table = gr.Dataframe(headers=BATCH_HEADERS, interactive=False, label="Results")
            batch_csv = gr.File(label="Results as CSV", interactive=False)
            batch_button.click(service.analyse_batch, batch_files, [batch_table, batch_csv], api_name="predict_batch")
        with gr.Tab("About the model"):
            gr.Markdown(service.about_markdown(), elem_id="model-card")
        # The programmatic endpoint: invisible components, so the API returns exactly (JSON, heatmap image).
        with gr.Row(visible=False):
            api_file = gr.File(type="filepath", label="image")
            api_target = gr.Radio(["pneumonia", "normal"], value="pneumonia", label="heatmap target")
            api_json = gr.JSON(label="result")
            api_heatmap = gr.Image(type="pil", format="png", label="heatmap overlay")
            api_button = gr.Button("predict")
        api_button.click(service.predict, [api_file, api_target], [api_json, api_heatmap], api_name="predict")
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=128)
    return demo


def _stop_on_sigterm(signum, frame) -> None:
    # SIGTERM (docker stop, systemd, a Space restarting) ends the app like Ctrl-C, so the exit clean-up
    # removes the private upload folder.
    raise KeyboardInterrupt


def main() -> int:
    """Load the served model and serve the app until interrupted (``python app.py``)."""
    from pneunet.backends import BACKEND_ENV
    from pneunet.integrity import ModelFileError

    os.environ.update(PRIVACY_ENVIRONMENT)
    upload_folder = private_upload_folder()
    os.environ["GRADIO_TEMP_DIR"] = str(upload_folder)  # where gradio stores uploads: the janitor's folder
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    pneunet_log = logging.getLogger("pneunet")
    pneunet_log.addHandler(handler)
    pneunet_log.setLevel(logging.INFO)
    pneunet_log.propagate = False
    try:
        # $PNEUNET_SITE: a site profile (python -m pneunet calibrate) for this model, refused for another one
        predictor = Predictor.load(backend=os.environ.get(BACKEND_ENV) or "auto", site=os.environ.get("PNEUNET_SITE") or None)
    except ModelFileError as error:  # missing, damaged or changed model / gate / segmenter file
        print(f"error: {error}", file=sys.stderr)
        return 1
    demo = build_demo(predictor, AppService(predictor, upload_folder))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    demo.launch(**LAUNCH_OPTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
