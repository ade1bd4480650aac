"""Images as the model sees them: 8-bit RGB from any mode a user may hand over, decoded in one place for
every reader (refer.dataset's training and test images, lib.inference's --image files), and the header
check of the up-front data check (`image_problem`: size and mode, no pixel decoding).

  16-bit grey ('I;16', 'I;16B', 'I;16L', 'I;16N', and 'I' as Pillow opens 16-bit PNGs and TIFFs):
      scaled to 8 bits (value / 257, rounded), then grey to RGB; a plain convert('RGB') would clip
      every value above 255 and give an all-white picture
  '1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'RGBX', 'CMYK', 'YCbCr', 'LAB': Pillow's convert('RGB')
      (palettes looked up, alpha dropped without premultiplying, CMYK and YCbCr converted)
  anything else ('F' 32-bit float, 'HSV', premultiplied 'RGBa' / 'La', ...): refused, one line
"""
import numpy as np

SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
CONVERTED_MODES = ('1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'RGBX', 'CMYK', 'YCbCr', 'LAB')
MODE_NAMES = {'F': '32-bit floating point', 'I;16S': 'signed 16-bit', 'HSV': 'HSV', 'RGBa': 'premultiplied RGBA',
              'La': 'premultiplied LA'}


def mode_problem(mode):
    """Why an image of Pillow mode `mode` cannot become 8-bit RGB here, as text; None when it can."""
    if mode in SIXTEEN_BIT_MODES or mode in CONVERTED_MODES:
        return None
    name = f" ({MODE_NAMES[mode]})" if mode in MODE_NAMES else ''
    return (f"is in mode '{mode}'{name}, which has no defined 8-bit RGB rendering; save it as 8-bit RGB "
            f"(or 8/16-bit grey, palette, RGBA, CMYK)")


def to_rgb(image):
    """The 8-bit RGB PIL image of `image` (see the module docstring); ValueError for a refused mode."""
    from PIL import Image
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float64)  # [H, W], any byte order
        grey = np.rint(np.clip(pixels, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, 'L').convert('RGB')
    problem = mode_problem(image.mode)
    if problem:
        raise ValueError(problem)
    return image.convert('RGB')


def open_rgb(path):
    """The image at `path` decoded to 8-bit RGB (to_rgb); PIL's errors (OSError, ValueError) propagate."""
    from PIL import Image
    with Image.open(path) as image:
        return to_rgb(image)


def image_problem(path, width=None, height=None):
    """What keeps the image at `path` from loading at width x height as 8-bit RGB, from its header alone (no
    pixel decoding): not found, unreadable, another size, a mode to_rgb refuses; None when it is fine."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
    except FileNotFoundError:
        return 'not found'
    except IsADirectoryError:
        return 'is a directory'
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        return f'cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})'
    if width is not None and height is not None and size != (width, height):
        return f'is {size[0]}x{size[1]} (width x height), but instances.json says {width}x{height}'
    return mode_problem(mode)
