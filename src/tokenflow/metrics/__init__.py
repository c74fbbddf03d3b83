"""Numbers for judging a video edit.

The TokenFlow paper judges an edit by

* **edit fidelity** -- CLIP cosine similarity between each edited frame and the target prompt
  (:func:`clip_scores`), and
* **temporal consistency** -- the warp error of Pix2Video's protocol (:func:`warp_errors`): optical
  flow is computed on the *source* video between frame ``i`` and ``i + gap``, the *edited* frame
  ``i + gap`` is warped back onto edited frame ``i``, and the mean absolute difference is taken over
  the pixels that pass a forward-backward consistency check (occlusions and pixels that leave the
  frame are excluded).

The same warp error measured on the source video itself is reported as the *floor*: flow is never
perfect, so even an untouched video has a small warp error, and an edit cannot be expected to beat
it. Structure preservation is reported as per-frame PSNR and SSIM of the edit against the source.

All frame arguments are ``[N, H, W, 3]`` ``uint8`` RGB numpy arrays (or frames read on demand, e.g. a
:class:`~tokenflow.io.FrameStore`). :func:`evaluate` ties the
metrics together into an :class:`EvalReport`; :func:`evaluate_files` reads two videos (or a run
folder) first.
"""

from .clip import ClipLoadError, clip_scores
from .evaluation import evaluate, evaluate_files
from .flow import FLOW_METHODS, consistency_mask, optical_flow, warp, warp_errors
from .image import PSNR_CAP_DB, psnr, ssim
from .report import EvalReport

__all__ = [
    "ClipLoadError",
    "EvalReport",
    "FLOW_METHODS",
    "PSNR_CAP_DB",
    "clip_scores",
    "consistency_mask",
    "evaluate",
    "evaluate_files",
    "optical_flow",
    "psnr",
    "ssim",
    "warp",
    "warp_errors",
]
