"""DALI pipeline definitions of the data path, one per use, parameterised by device.

`resize=False` (used on the CPU, see insclr/data/resize.py) ends a pipeline after the decode.

`dali_devices(device)` maps a torch device to DALI's arguments: on the CPU the pipelines run
with device_id=None and CPU operators; on a GPU the JPEG decode is "mixed" (nvJPEG / the
hardware decoder) and the resizes run on the GPU. Outputs are uint8 HWC; the loaders hand
them to torch as [B,3,H,W] views (channels_last memory), normalised later on the device.

JPEG chroma upsampling: the GPU decoders use libjpeg-turbo's "fancy" (triangle) upsampling, as
the CPU decoder and Pillow do (`jpeg_fancy_upsampling`); nvJPEG's default differed from the CPU
decode by 6.8 levels on average on 4:2:0 test images with strong colour changes (H200 run).

Resize filters (chosen per view, see docs/data.md): the training views and the square features
of the pool use linear with antialiasing (PIL's BILINEAR, the original's training transforms);
evaluation images (mode "longest" and query crops) use Lanczos3 with antialiasing, the filter of
PIL's thumbnail with which the original evaluator scales them (on the CPU the loaders call Pillow
itself, insclr/data/resize.py). The training crop is cheap anyway because only the crop window
is decoded.

EXIF orientation is never applied (`adjust_orientation=False`): the original opens images with
PIL, which keeps the stored pixels, and the query boxes are in that frame. A shard folder made
with `insclr.shard --exif-transpose` stores rotated pixels instead (docs/sharding.md).
"""

import re
import warnings

import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def



def dali_devices(device):
    """torch device -> (device_id, decoder device, operator device) for a DALI pipeline."""
    device = torch.device(device)
    if device.type == "cuda":
        return (device.index if device.index is not None else torch.cuda.current_device()), "mixed", "gpu"
    if device.type != "cpu":
        raise ValueError(f"unsupported device {device} for the DALI data path (cpu or cuda)")
    return None, "cpu", "cpu"


def _decode(jpegs, decoder_device):
    return fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, jpeg_fancy_upsampling=True,
                             adjust_orientation=False)


def _decode_window(jpegs, anchor, shape, decoder_device):
    """Decode only the window at anchor (x, y) of shape (w, h), in pixels."""
    return fn.decoders.image_slice(jpegs, anchor, shape, device=decoder_device, output_type=types.RGB,
                                   jpeg_fancy_upsampling=True, adjust_orientation=False, axis_names="WH",
                                   normalized_anchor=False, normalized_shape=False)


def _resize(images, op_device, interp=types.INTERP_LINEAR, **kw):
    return fn.resize(images, device=op_device, interp_type=interp, antialias=True, **kw)


def _eval_resize(images, op_device, size):
    """Evaluation images: Lanczos3 with antialiasing to `size` (h, w) float, whole pixels."""
    return _resize(images, op_device, interp=types.INTERP_LANCZOS3, size=size)


@pipeline_def
def stream_pipeline(source, mode, size, decoder_device, op_device, resize=True):
    """Whole images in the order `source()` gives their JPEG bytes (insclr.data.stream reads and
    checks them): images uint8 HWC.

    mode "square": resize to size×size (linear); "longest": `source()` also gives per sample the
    output size (h, w) float (whole pixels, the original's thumbnail size), Lanczos3.
    resize=False: return the decoded images (the caller resizes, see insclr.data.resize).
    """
    if mode not in ("square", "longest"):
        raise ValueError(f"stream_pipeline mode must be square or longest, got {mode!r}")
    if mode == "longest":
        jpegs, out_size = fn.external_source(source=source, num_outputs=2, batch=True,
                                             dtype=[types.UINT8, types.FLOAT])
    else:
        jpegs = fn.external_source(source=source, batch=True, dtype=types.UINT8)
    images = _decode(jpegs, decoder_device)
    if not resize:
        return images
    if mode == "square":
        return _resize(images, op_device, size=[size, size])
    return _eval_resize(images, op_device, out_size)


@pipeline_def
def crop_pipeline(source, decoder_device, op_device, resize=True):
    """Random-access crops (evaluation queries) as PIL's crop makes them: `source()` gives per
    sample the JPEG bytes, the window inside the image to decode, anchor (x, y) and shape (w, h),
    the box relative to that window, anchor and shape (outside the window: black), and the output
    size (h, w) float (whole pixels), all in pixels. Only the window is decoded; Lanczos3.
    resize=False: return the boxes unscaled."""
    jpegs, anchor, shape, box_anchor, box_shape, out_size = fn.external_source(
        source=source, num_outputs=6, batch=True, dtype=[types.UINT8] + [types.FLOAT] * 5)
    window = _decode_window(jpegs, anchor, shape, decoder_device)
    crops = fn.slice(window, box_anchor, box_shape, device=op_device, axis_names="WH", normalized_anchor=False,
                     normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)
    return _eval_resize(crops, op_device, out_size) if resize else crops


@pipeline_def
def train_pipeline(source, size, noaug_size, decoder_device, op_device, resize=True):
    """Two views of each row from one decode. `source()` gives per sample: JPEG bytes, crop anchor
    (x, y) and shape (w, h) (only without noaug_size), and the resize ROI start/end (y, x) that
    realise crop + flip.

    With noaug_size the whole image is decoded (the no-aug view needs it) and the ROI is in image
    coordinates; without, only the crop window is decoded and the ROI is relative to it. A ROI
    whose x start exceeds its end flips the crop horizontally inside the same resize.
    resize=False: return only the decoded images (whole with noaug_size, else the windows).
    """
    if noaug_size:  # source gives (jpegs, roi_start, roi_end)
        jpegs, roi_start, roi_end = fn.external_source(source=source, num_outputs=3, batch=True,
                                                       dtype=[types.UINT8, types.FLOAT, types.FLOAT])
        images = _decode(jpegs, decoder_device)
        if not resize:
            return (images,)
        aug = _resize(images, op_device, size=[size, size], roi_start=roi_start, roi_end=roi_end)
        noaug = _resize(images, op_device, size=[noaug_size, noaug_size])
        return aug, noaug
    jpegs, anchor, shape, roi_start, roi_end = fn.external_source(
        source=source, num_outputs=5, batch=True,
        dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.FLOAT])
    crops = _decode_window(jpegs, anchor, shape, decoder_device)
    if not resize:
        return (crops,)
    return (_resize(crops, op_device, size=[size, size], roi_start=roi_start, roi_end=roi_end),)


DECODE_FAILURE = re.compile(r"Failed to decode sample #(\d+)")


def failed_row(error):
    """The batch row a DALI decode error names ("Failed to decode sample #R"), or None."""
    found = DECODE_FAILURE.search(str(error))
    return int(found.group(1)) if found else None


def build(pipe):
    """pipe.build(), without DALI's warning about external-source outputs the pipeline leaves unused:
    with resize=False the ROI / size inputs are unused by design (the CPU path crops in torch
    from the same Python-side windows) and cost nothing worth a second pipeline variant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The external source node .* not used")
        pipe.build()
    return pipe


def to_torch(batch, device):
    """A DALI TensorList of equal-shape HWC uint8 samples -> torch uint8 [B,3,H,W] on `device`.

    The result is a permuted view of an NHWC buffer, i.e. channels_last memory format.
    """
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = batch.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
    stream = torch.cuda.current_stream(device) if out.is_cuda else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out.permute(0, 3, 1, 2)
