"""The edge runner: ``python -m pneunet predict`` under the name a device's users know, on numpy + Pillow
+ one inference runtime (never torch; ``edge/requirements.txt``).

    python -m edge.run IMAGE_OR_FOLDER... [--model PATH] [--csv out.csv] [--cam OUT_DIR] [--heatmaps OUT_DIR] [--threads N]

Without ``--model`` it runs the committed export of the shipped model in edge/models
(``pneunet.backends.default_model``: int8 ONNX where it passed its parity gate, else fp32; int8 TFLite
where only a TFLite runtime is installed), with the lung-field segmenter shipped beside it, through the
same inference core as the app (``pneunet.predictor.Predictor``). One line per image on stdout; an
unreadable file, or one the input gate refuses, gets a one-line reason on stderr, the rest still run, and
the exit code is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import sys

from pneunet.cli import add_predict_arguments, run_predict


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edge.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predict_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_predict(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
