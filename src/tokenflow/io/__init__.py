"""Video input and output: probing, streaming frame reads, resizing, H.264 writing with audio.

Everything that touches a video file goes through this module.  Frames are always
``HxWx3`` ``uint8`` RGB numpy arrays with the container's rotation metadata applied,
so a portrait phone clip comes out upright.  Any bit depth and chroma layout (10-bit,
4:4:4, RGB) is converted to 8-bit RGB; a source with an alpha channel (webm/vp9 with
alpha, RGBA png, a gif's transparent colour) is composited over black
(:data:`ALPHA_BACKGROUND`).

Reading supports anything FFmpeg (through PyAV) can demux and decode -- mp4, mov,
webm, mkv, avi, gif -- and a folder of images (png/jpg/jpeg/bmp/webp, sorted by
name, numbers compared numerically).  Frames are decoded one at a time, so a long
video is never held in memory unless the caller asks for it with :func:`load_frames`.

Writing (:class:`VideoWriter`, :func:`write_video`) encodes H.264 (libx264, yuv420p)
and can carry over the audio of the source clip, trimmed to the edited range.  A
variable-frame-rate source keeps its frames' timestamps: :func:`read_frames` records
them (``FrameReader.times``) and :class:`VideoWriter` takes them per frame.
"""

from .disktensor import DiskTensor
from .framestore import FrameStore
from .preview import contact_sheet, side_by_side
from .probe import ALPHA_BACKGROUND, DEFAULT_FOLDER_FPS, IMAGE_EXTENSIONS, VideoInfo, probe
from .read import FrameReader, check_packets, frame_spans, load_frames, read_frames
from .size import resize_frames, working_size
from .space import check_free_space, check_writable, is_out_of_space, out_of_space_error, staged_bytes
from .write import VFR_TIME_BASE, VideoWriter, write_video

__all__ = [
    "ALPHA_BACKGROUND",
    "DEFAULT_FOLDER_FPS",
    "IMAGE_EXTENSIONS",
    "FrameReader",
    "FrameStore",
    "DiskTensor",
    "VFR_TIME_BASE",
    "VideoInfo",
    "VideoWriter",
    "check_free_space",
    "check_packets",
    "check_writable",
    "contact_sheet",
    "frame_spans",
    "is_out_of_space",
    "load_frames",
    "out_of_space_error",
    "probe",
    "read_frames",
    "resize_frames",
    "side_by_side",
    "staged_bytes",
    "working_size",
    "write_video",
]
