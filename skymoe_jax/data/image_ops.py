"""Image operations of the input pipeline: decode, pad-to-square + resize, crops, normalisation.

All work on uint8 HxWx3 numpy arrays (PIL does the decoding and resampling; both release the GIL,
so the pipeline's parallel calls overlap). Boxes are (x1, y1, x2, y2) pixels of the image given.
"""
import io

import numpy as np
from PIL import Image

# CLIP's pixel statistics (the vision tower was pretrained with them).
CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)


# The most pixels an image may have, at conversion (the converters' --max_image_pixels) and when
# decoded for training (config.data.max_image_pixels, the same default). A 12000x12000 PNG can be
# a few hundred KB on disk yet take seconds and gigabytes to decode, every time it is drawn.
MAX_IMAGE_PIXELS = 8192 * 8192


class ImageDecodeError(ValueError):
  """Encoded image bytes that PIL cannot decode."""


class ImageTooLargeError(ImageDecodeError):
  """An image with more pixels than allowed, refused from its header before any pixel is decoded."""


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
  """The image of `data`, opened but not decoded, once its header says it has at most
  `max_pixels` pixels; the one home of the pixel rule (conversion and training use it).

  Why here and not PIL's Image.MAX_IMAGE_PIXELS: PIL's check is process-global and only a
  warning below twice its limit; this one is per call and refuses before `load` decodes.
  Raises ImageTooLargeError above the limit and ImageDecodeError when the header is unreadable.
  """
  try:
    image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:  # PIL's own limit, far above ours by default
    raise ImageTooLargeError(f'image too large ({e})') from None
  except Exception as e:  # PIL raises a zoo of exception types for bad bytes
    raise ImageDecodeError(f'cannot decode image ({type(e).__name__}: {e})') from None
  w, h = image.size
  if w * h > max_pixels:
    image.close()
    raise ImageTooLargeError(f'image of {w}x{h} = {w * h} pixels, more than the limit of '
                             f'{max_pixels} (max_image_pixels)')
  return image


def decode(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """Encoded PNG/JPEG/TIFF bytes -> uint8 [H, W, 3] RGB; ImageTooLargeError (a subclass of
  ImageDecodeError) above `max_pixels`, before decoding."""
  with open_image(data, max_pixels) as image:
    try:
      image.load()
      return np.asarray(image.convert('RGB'))
    except Exception as e:  # PIL raises a zoo of exception types for bad bytes
      raise ImageDecodeError(f'cannot decode image ({type(e).__name__}: {e})') from None


def encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


def pad_to_square(image: np.ndarray) -> np.ndarray:
  """Pads the short side equally on both sides with the mean colour (LLaVA's pad), matching
  boxes.parse(..., pad_to_square=True)'s frame."""
  h, w = image.shape[:2]
  side = max(h, w)
  if h == w:
    return image
  fill = image.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
  out = np.empty((side, side, 3), np.uint8)
  out[:] = fill
  top, left = (side - h) // 2, (side - w) // 2
  out[top:top + h, left:left + w] = image
  return out


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize to size x size (antialiased when shrinking)."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def global_view(image: np.ndarray, size: int, pad: bool = True) -> np.ndarray:
  """The whole image at model resolution."""
  return resize(pad_to_square(image) if pad else image, size)


def crop_square(image: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
  """The square of `side` pixels centred at (cx, cy), shifted to lie inside the image."""
  h, w = image.shape[:2]
  side = int(round(min(max(side, 1.0), h, w)))
  x0 = int(round(min(max(cx - side / 2, 0), w - side)))
  y0 = int(round(min(max(cy - side / 2, 0), h - side)))
  return image[y0:y0 + side, x0:x0 + side]


def local_view(image: np.ndarray, boxes: np.ndarray, size: int, rng: np.random.Generator,
               object_centred_prob: float, scale=(0.25, 0.5)) -> np.ndarray:
  """A local crop at model resolution: around a random object when there are boxes (with
  probability object_centred_prob), else a random square of `scale` x the short side."""
  h, w = image.shape[:2]
  short = min(h, w)
  if len(boxes) and rng.random() < object_centred_prob:
    x1, y1, x2, y2 = boxes[rng.integers(len(boxes))]
    # The object plus context: at least the low end of `scale`, at least twice the object.
    side = max(scale[0] * short, 2.0 * max(x2 - x1, y2 - y1))
    return resize(crop_square(image, (x1 + x2) / 2, (y1 + y2) / 2, side), size)
  side = rng.uniform(scale[0], scale[1]) * short
  cx = rng.uniform(side / 2, w - side / 2)
  cy = rng.uniform(side / 2, h - side / 2)
  return resize(crop_square(image, cx, cy, side), size)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 CLIP-normalised pixels, the vision tower's input."""
  return (image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
