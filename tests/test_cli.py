"""``python -m pneunet predict``: files and folders, CSV in input order, one reason per bad file, exit 1."""

import csv
import shutil

from pneunet.cli import main
from pneunet.decision import format_probability
from tests.helpers import EXAMPLES


def test_folder_with_a_bad_file_gives_rows_in_order_and_exit_code_1(tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for path in sorted(EXAMPLES.glob("*.jpeg"))[:2]:
        shutil.copy(path, folder / path.name)
    data = next(EXAMPLES.glob("*.jpeg")).read_bytes()
    (folder / "a_truncated.jpeg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "results.csv"
    assert main(["predict", str(folder), "--csv", str(out), "--quiet"]) == 1
    rows = list(csv.DictReader(open(out)))
    assert [r["path"].split("/")[-1] for r in rows] == sorted(p.name for p in folder.iterdir())
    assert rows[0]["error"].startswith("image data is damaged or truncated") and rows[0]["label"] == ""
    assert all(r["label"] in ("normal", "pneumonia") and 0 <= float(r["probability_value"]) <= 1 for r in rows[1:])
    # people read the same probability format as on the page; scripts read probability_value
    assert all(r["pneumonia_probability"] == format_probability(float(r["probability_value"])) for r in rows[1:])
    assert "a_truncated.jpeg: image data is damaged" in capsys.readouterr().err


def test_all_good_files_exit_0_and_print_one_line_each(capsys):
    files = [str(p) for p in sorted(EXAMPLES.glob("pneumonia_*.jpeg"))]
    assert main(["predict", *files, "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["pneumonia"] * len(files)


def test_heatmaps_saves_raw_evidence_at_the_images_own_size_and_cam_draws_the_bar(tmp_path):
    import numpy as np
    from PIL import Image

    from pneunet.predictor import Predictor

    wide = tmp_path / "wide.png"
    source = sorted(EXAMPLES.glob("pneumonia_*.jpeg"))[0]
    Image.open(source).convert("L").resize((300, 200)).save(wide)
    assert main(["predict", str(wide), "--heatmaps", str(tmp_path / "maps"), "--cam", str(tmp_path / "cam"),
                 "--csv", str(tmp_path / "out.csv"), "--no-gate"]) == 0
    evidence = np.load(tmp_path / "maps" / "wide_evidence.npy")
    assert evidence.shape == (200, 300) and evidence.dtype == np.float32
    # raw: before lung masking, so it is not zero outside the lungs, and it is the predictor's own map
    result = Predictor.load(gate=False).predict(wide, heatmap=True, gate=False)
    stretched = np.asarray(Image.fromarray(result.evidence["pneumonia"]).resize((300, 200), Image.Resampling.BILINEAR))
    assert np.allclose(evidence, stretched, atol=1e-6)
    assert np.abs(evidence[~np.asarray(Image.fromarray(result.lungs.mask).resize((300, 200)))]).max() > 0
    overlay = Image.open(tmp_path / "cam" / "wide_cam.png")
    assert overlay.height == 200 and overlay.width > 300
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert rows[0]["lung_fields"] == "found"
