"""Regenerate the sample clip that ships in examples/ (a camera pan across a public-domain photo).

    python scripts/make_sample_clip.py                 # writes examples/pan.mp4
    python scripts/make_sample_clip.py out.mkv --frames 48

The photo is scikit-image's ``astronaut`` (NASA, public domain).  The clip is
384x256 (non-square on purpose), 12 fps, with a 440 Hz sine-tone audio track.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tokenflow.io import probe
from tokenflow.testing import make_pan_clip

log = logging.getLogger("make_sample_clip")

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "examples" / "pan.mp4"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help="output path (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=32, help="number of frames (default: %(default)s)")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--shift", type=int, default=4, help="pixels the camera moves per frame")
    parser.add_argument("--fps", type=float, default=12.0)
    parser.add_argument("--top", type=int, default=20, help="y offset of the crop in the photo (keeps the face in)")
    parser.add_argument("--image", default="astronaut", help="scikit-image sample photo (astronaut, coffee, chelsea)")
    parser.add_argument("--crf", type=int, default=20, help="H.264 quality, lower is better and bigger")
    parser.add_argument("--no-audio", action="store_true", help="leave out the sine-tone audio track")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_pan_clip(
        args.out,
        num_frames=args.frames,
        width=args.width,
        height=args.height,
        shift=args.shift,
        fps=args.fps,
        audio=not args.no_audio,
        image=args.image,
        top=args.top,
        crf=args.crf,
    )
    info = probe(args.out)
    size = args.out.stat().st_size if args.out.is_file() else 0
    log.info(
        "wrote %s: %dx%d, %s frames at %.3g fps, audio=%s, %d KB",
        args.out, info.width, info.height, info.num_frames, info.fps, info.has_audio, size // 1024,
    )


if __name__ == "__main__":
    main()
