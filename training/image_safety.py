"""Size encoded images from their headers and refuse the oversized ones before decoding them.

The size of an encoded image says nothing about the memory its decoding costs: a PNG of 20,000 x
20,000 zero pixels is 0.39 MB and decodes to 1.2 GB; an animated GIF of 100 frames of 2,000 x 2,000
is 0.38 MB and `tf.io.decode_image(..., expand_animations=False)` still decodes every frame
(0.4 GB). Every path of this project that decodes image bytes (the `serving_bytes` signature of an
export, `python -m training.predict`, the image-folder loader of `training.data`) goes through
`decode_image` here, which first reads the image's size from its header, inside the TF graph (TF
Serving runs the SavedModel without our Python):

| format | magic bytes | size read from |
|---|---|---|
| JPEG | `FF D8 FF` | the frame header (SOF), found by walking the marker segments (*) |
| PNG | `89 'PNG' 0D 0A 1A 0A` | the IHDR chunk: width, height big-endian uint32 at bytes 16-24 |
| GIF | `'GIF8'` | the logical screen (little-endian uint16 at bytes 6-10), then every image descriptor |
| BMP | `'BM'` | little-endian int32 width, height at bytes 18-26 (height < 0: top-down rows) |

(*) and, once that passed, `tf.image.extract_jpeg_shape` (libjpeg's own reading) before decoding.

Any other bytes (empty, truncated before the size fields, text, WebP and other formats that are
not sized here) are refused, and so are headers that do not parse (a corrupt PNG IHDR, a JPEG scan
before its frame header, a GIF cut inside its first frame). An image is refused when its pixels,
`width * height` (for a GIF, the sum over its frames of the larger of the screen and the frame),
exceed `max_image_pixels` (`DEFAULT_MAX_IMAGE_PIXELS` = 100 million: above the 45 to 61 megapixel
sensors of full-frame cameras and the 48 megapixel photos of phones; a 102 megapixel
medium-format photo or a phone's 200 megapixel mode needs a higher limit), or have none.

A progressive JPEG (frame markers SOF2, SOF6, SOF10, SOF14) costs more than its pixels: libjpeg
keeps the whole image's DCT coefficients while it decodes the scans (2 bytes per component and
pixel, for 1x1 sampling) besides the 3-byte RGB output. It is charged
`ceil(pixels * (3 + 2 * components) / 3)` pixels against `max_image_pixels` (3 times its pixels
with 3 components, 11/3 with 4, CMYK): a 160-byte 10,000 x 10,000 CMYK claim would cost +1066 MB
to decode. The refusal says so: "... = 100000000 pixels, a progressive JPEG with 4 components:
charged as 366666667 pixels (...), over the limit of ...". Baseline JPEGs are charged their pixels
(libjpeg decodes them in strips of rows).

A refusal is a `tf.errors.InvalidArgumentError` whose message names the image, its size and the limit, e.g.

    image_bytes[0]: 20000 x 20000 pixels x 1 frame = 400000000 pixels, over the limit of
    100000000 pixels (max_image_pixels); refused before decoding

and costs about the size of the file (a GIF: about 15 bytes per byte of the file while its blocks
are walked; measured for issue 21's bombs through an export: +0.7 MB for the PNG, +5.7 MB for the
GIF, test_export.py). Only the first frame of a GIF is decoded (the file is cut after its first image
and given a trailer), and at most one image is decoded at a time by `decode_images`, so the memory
of a batch grows with its resized images only.

A file that passes the size check may still fail to decode (truncated data, a corrupt chunk): the
decoder's `InvalidArgumentError` then names no image; it allocates at most the checked size.

This module imports only TensorFlow (no `tf_revnet`, nothing else of `training/`), so that
`training/predict.py` can be copied with it.

Example:

```python
image = image_safety.decode_image(tf.io.read_file("cat.jpg"), max_pixels=50_000_000)  # uint8 (H, W, 3)
height, width, frames, pixels = image_safety.image_size(tf.io.read_file("anim.gif")).numpy()
```
"""

from __future__ import annotations

import numbers
import re

import tensorflow as tf

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "MAX_LIMIT", "MAX_GIF_BLOCKS", "MAX_JPEG_SEGMENTS", "FORMATS",
           "image_size", "check_image", "decode_image", "decode_images", "refusal_reason",
           "check_max_image_pixels"]

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_LIMIT = 2**63 - 1  # the largest max_image_pixels (an int64 tensor in the graph)
# A GIF is walked block by block (extensions, frames); more blocks than this are refused (about
# 10,000 frames). This bounds the time of the walk on hostile files of many empty blocks (1.3 s
# at the limit, measured on a 2-core CPU).
MAX_GIF_BLOCKS = 20_000
# Likewise the marker segments of a JPEG before its frame header (real files: a handful of APPn
# metadata and quantization tables).
MAX_JPEG_SEGMENTS = 1_000
FORMATS = ("JPEG", "PNG", "GIF", "BMP")
_JPEG, _PNG, _GIF, _BMP, _UNKNOWN = range(5)
_HEAD = 32  # header bytes read for the magic numbers and the PNG, GIF and BMP size fields
_GIF_TRAILER = b"\x3b"
# Status codes of the GIF and JPEG walks.
_RUNNING, _DONE, _TRUNCATED, _CORRUPT, _TOO_MANY_BLOCKS = range(5)


def check_max_image_pixels(value, name="max_image_pixels"):
    """Returns `value` if it is a positive integer (a NumPy integer too) of the int64 range (the
    limit is an int64 tensor), else raises `ValueError`.

    Args:
        value: int.
        name: str. The argument or flag named in the error.

    Raises:
        ValueError: `value` is not an integer >= 1, or is over `MAX_LIMIT` (2^63 - 1).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {value!r}")
    if value > MAX_LIMIT:
        raise ValueError(f"{name} must be at most {MAX_LIMIT}. Received: {value!r}")
    return int(value)


def _prefix(name):
    return tf.strings.join([tf.convert_to_tensor(name, tf.string), ": "])


def _fail_unless(condition, name, *parts):
    """An `Assert` op whose message is `name: ` followed by the parts (str or scalar tensors)."""
    message = tf.strings.join([_prefix(name)] + [
        part if isinstance(part, str) else tf.strings.as_string(part) for part in parts])
    return tf.debugging.Assert(condition, [message])


def _head(contents):
    """The first `_HEAD` bytes as int64 `(32,)`, zero-padded; and the length as int64."""
    head = tf.strings.substr(contents, 0, _HEAD)  # pos 0 is valid for any string, also ""
    head = tf.strings.substr(tf.strings.join([head, b"\0" * _HEAD]), 0, _HEAD)
    head = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
    return tf.reshape(head, [_HEAD]), tf.cast(tf.strings.length(contents), tf.int64)


def _starts_with(head, magic):
    return tf.reduce_all(tf.equal(head[:len(magic)], tf.constant(list(magic), tf.int64)))


def _format(head):
    return tf.case([(_starts_with(head, b"\xff\xd8\xff"), lambda: tf.constant(_JPEG)),
                    (_starts_with(head, b"\x89PNG\r\n\x1a\n"), lambda: tf.constant(_PNG)),
                    (_starts_with(head, b"GIF8"), lambda: tf.constant(_GIF)),
                    (_starts_with(head, b"BM"), lambda: tf.constant(_BMP))],
                   default=lambda: tf.constant(_UNKNOWN), exclusive=True)


def _big_endian(head, start, size):
    value = tf.constant(0, tf.int64)
    for i in range(size):
        value = value * 256 + head[start + i]
    return value


def _little_endian(head, start, size):
    return _big_endian(tf.reverse(head[start:start + size], [0]), 0, size)


def _sized(height, width, frames, pixels, cut, components=None, frame=None):
    """int64 `(9,)`: height, width, frames, pixels, bytes to decode, pixels charged against the
    limit, the components of a progressive JPEG (0 for any other image), and the width and
    height of a GIF's largest frame when it is larger than the screen (else 0, 0)."""
    zero = tf.zeros_like(pixels)
    charged = pixels if components is None else _charged(pixels, components)
    components = zero if components is None else components
    frame_width, frame_height = (zero, zero) if frame is None else frame
    return tf.stack([height, width, frames, pixels, cut, charged, components, frame_width,
                     frame_height])


def _charged(pixels, components):
    """The pixels a JPEG of `pixels` pixels is charged: `ceil(pixels * (3 + 2 * components) / 3)`
    for a progressive one (`components > 0`), else `pixels`."""
    return tf.where(components > 0, (pixels * (3 + 2 * components) + 2) // 3, pixels)


def _byte_reader(data, n):
    """`byte(i)`: int64 value of `data[i]` (uint8 `(n,)`), or -1 past either end."""
    def byte(i):
        inside = tf.logical_and(i >= 0, i < n)
        value = tf.gather(data, tf.clip_by_value(i, 0, tf.maximum(n - 1, 0)))
        return tf.where(inside, tf.cast(value, tf.int64), tf.constant(-1, tf.int64))
    return byte


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic).
_JPEG_SOF = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
# Progressive frames: libjpeg keeps the whole image's DCT coefficients while it decodes them.
_JPEG_PROGRESSIVE = (0xC2, 0xC6, 0xCA, 0xCE)
_JPEG_STANDALONE = (0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8)


def _jpeg_size(contents, n, name):
    """Walks a JPEG's marker segments up to its frame header (SOF): its height and width.

    The walk reads the segment lengths, as libjpeg does, instead of calling
    `tf.image.extract_jpeg_shape`, whose error for a header over libjpeg's 65,500-pixel maximum
    ("Invalid JPEG data") names neither the size nor the image; `decode_image` still compares
    libjpeg's own reading of the header with the limit before decoding.
    """
    data = tf.io.decode_raw(contents, tf.uint8)
    byte = _byte_reader(data, n)
    sof = tf.constant(_JPEG_SOF, tf.int64)
    progressive = tf.constant(_JPEG_PROGRESSIVE, tf.int64)
    standalone = tf.constant(_JPEG_STANDALONE, tf.int64)

    def body(pos, segments, height, width, components, status):
        prefix, marker = byte(pos), byte(pos + 1)
        length = byte(pos + 2) * 256 + byte(pos + 3)
        is_sof = tf.reduce_any(tf.equal(marker, sof))
        is_standalone = tf.reduce_any(tf.equal(marker, standalone))
        step = tf.where(tf.equal(marker, 0xFF), tf.constant(1, tf.int64),  # a fill byte
                        tf.where(is_standalone, tf.constant(2, tf.int64), 2 + length))
        new_status = tf.where(
            tf.logical_or(marker < 0, tf.logical_and(is_sof, byte(pos + 9) < 0)), _TRUNCATED,
            tf.where(tf.logical_or(tf.not_equal(prefix, 0xFF), tf.logical_or(
                tf.logical_and(tf.logical_not(is_standalone), tf.logical_and(
                    tf.not_equal(marker, 0xFF), length < 2)),
                tf.logical_or(tf.equal(marker, 0xDA), tf.equal(marker, 0xD9)))), _CORRUPT,
                tf.where(is_sof, _DONE, _RUNNING)))
        new_status = tf.where(tf.logical_and(tf.equal(new_status, _RUNNING),
                                             segments + 1 > MAX_JPEG_SEGMENTS),
                              _TOO_MANY_BLOCKS, new_status)
        height = tf.where(is_sof, byte(pos + 5) * 256 + byte(pos + 6), height)
        width = tf.where(is_sof, byte(pos + 7) * 256 + byte(pos + 8), width)
        components = tf.where(tf.logical_and(is_sof, tf.reduce_any(tf.equal(marker, progressive))),
                              tf.maximum(byte(pos + 9), 1), components)
        return (pos + step, segments + 1, height, width, components,
                tf.cast(new_status, tf.int64))

    zero = tf.constant(0, tf.int64)
    _, _, height, width, components, status = tf.while_loop(
        lambda *state: tf.equal(state[-1], _RUNNING), body,
        [tf.constant(2, tf.int64), zero, zero, zero, zero, tf.constant(_RUNNING, tf.int64)])
    checks = [
        _fail_unless(tf.not_equal(status, _TRUNCATED), name, "truncated JPEG header (", n,
                     " bytes, no frame header)"),
        _fail_unless(tf.not_equal(status, _CORRUPT), name, "corrupt JPEG header (no marker "
                     "segment where one starts, or a scan before the frame header)"),
        _fail_unless(tf.not_equal(status, _TOO_MANY_BLOCKS), name, "JPEG of more than ",
                     MAX_JPEG_SEGMENTS, " marker segments before its frame header; refused "
                     "before decoding"),
    ]
    with tf.control_dependencies(checks):
        one = tf.constant(1, tf.int64)
        return _sized(tf.identity(height), width, one, height * width, n, components)


def _png_size(head, n, name):
    width, height = _big_endian(head, 16, 4), _big_endian(head, 20, 4)
    ok = tf.logical_and(n >= 33, tf.logical_and(
        _big_endian(head, 8, 4) == 13, _big_endian(head, 12, 4) == _big_endian(
            tf.constant(list(b"IHDR"), tf.int64), 0, 4)))
    checks = [
        _fail_unless(ok, name, "corrupt or truncated PNG header (no 13-byte IHDR chunk after the "
                     "signature; ", n, " bytes)"),
        _fail_unless(tf.logical_and(width < 2**31, height < 2**31), name, "corrupt PNG header: "
                     "IHDR width ", width, " or height ", height, " is over 2^31 - 1"),
    ]
    with tf.control_dependencies(checks):
        one = tf.constant(1, tf.int64)
        return _sized(tf.identity(height), width, one, width * height, n)


def _bmp_size(head, n, name):
    width = _little_endian(head, 18, 4)
    height = _little_endian(head, 22, 4)
    width, height = [tf.where(v >= 2**31, v - 2**32, v) for v in (width, height)]  # int32
    check = _fail_unless(n >= 26, name, "truncated BMP header (", n, " bytes, the size fields end "
                         "at byte 26)")
    with tf.control_dependencies([check]):
        width, height = tf.abs(width), tf.abs(height)
        return _sized(height, width, tf.constant(1, tf.int64), width * height, n)


def _sub_block_ends(data):
    """For every position `i` of a GIF, where the chain of data sub-blocks starting at `i` ends.

    A chain is `size, size bytes, size, ..., 0`; `ends[i]` is the position of its 0 byte, or `n`
    (= len(data)) if the chain runs past the end. Computed for all positions at once by pointer
    doubling (`ceil(log2(n)) + 1` gathers), so that the walk over the blocks (`_gif_size`) jumps
    over an image's data in one step, whatever the sizes of its sub-blocks.

    Returns int32 `(n + 1,)` (`ends[n] = n`).
    """
    sizes = tf.cast(data, tf.int32)
    n = tf.size(sizes)
    positions = tf.range(n)
    ends = tf.where(tf.equal(sizes, 0), positions, tf.minimum(positions + sizes + 1, n))
    ends = tf.concat([ends, [n]], 0)
    rounds = tf.cast(tf.math.ceil(tf.math.log(tf.cast(n, tf.float32) + 2.0) / tf.math.log(2.0)),
                     tf.int32) + 1
    _, ends = tf.while_loop(lambda i, _: i < rounds,
                            lambda i, e: (i + 1, tf.gather(e, e)), [tf.constant(0), ends])
    return ends


def _colour_table(packed):
    """Bytes of the colour table that a GIF packed-fields byte (int64) announces."""
    return tf.where(packed >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), packed % 8),
                    tf.zeros_like(packed))


def _gif_size(contents, head, n, name):
    """Walks a GIF's blocks: `(height, width, frames, pixels, end of the first frame)`."""
    check = _fail_unless(n >= 13, name, "truncated GIF header (", n, " bytes, the logical "
                         "screen descriptor ends at byte 13)")
    with tf.control_dependencies([check]):
        data = tf.io.decode_raw(contents, tf.uint8)
    width, height = _little_endian(head, 6, 2), _little_endian(head, 8, 2)
    canvas = width * height
    packed = head[10]
    start = 13 + _colour_table(packed)
    ends = _sub_block_ends(data)

    byte = _byte_reader(data, n)

    def end_of_chain(i):  # position after the 0 byte of the chain at i, or n + 1 (truncated)
        return tf.cast(tf.gather(ends, tf.clip_by_value(i, 0, n)), tf.int64) + 1

    def body(pos, blocks, frames, pixels, first_end, largest_width, largest_height, status):
        kind = byte(pos)
        # An extension (0x21, label): its sub-blocks follow the label.
        extension_end = end_of_chain(pos + 2)
        # An image (0x2C, 9-byte descriptor, local colour table, LZW code size, sub-blocks).
        frame_width = byte(pos + 5) + 256 * byte(pos + 6)
        frame_height = byte(pos + 7) + 256 * byte(pos + 8)
        frame_packed = byte(pos + 9)
        image_end = end_of_chain(pos + 11 + _colour_table(tf.maximum(frame_packed, 0)))
        is_image = tf.equal(kind, 0x2C)
        block_end = tf.where(is_image, image_end, extension_end)
        complete = tf.logical_and(block_end <= n, tf.logical_or(
            tf.logical_not(is_image), frame_packed >= 0))
        known = tf.logical_or(is_image, tf.equal(kind, 0x21))
        # Past the last frame, a missing trailer or trailing garbage ends the walk (the frames
        # counted so far are the file's); before the first one, they are errors.
        stop = tf.logical_or(tf.equal(kind, 0x3B), frames > 0)
        new_status = tf.where(
            known, tf.where(complete, _RUNNING, tf.where(frames > 0, _DONE, _TRUNCATED)),
            tf.where(stop, _DONE, tf.where(kind < 0, _TRUNCATED, _CORRUPT)))
        new_status = tf.where(tf.logical_and(tf.equal(new_status, _RUNNING),
                                             blocks + 1 > MAX_GIF_BLOCKS),
                              _TOO_MANY_BLOCKS, new_status)
        # A frame counts once its descriptor is complete (its data may be cut short).
        counted = tf.logical_and(is_image, frame_packed >= 0)
        frames = frames + tf.cast(counted, tf.int64)
        larger = tf.logical_and(counted, tf.logical_and(
            frame_width * frame_height > canvas,
            frame_width * frame_height > largest_width * largest_height))
        largest_width = tf.where(larger, frame_width, largest_width)
        largest_height = tf.where(larger, frame_height, largest_height)
        pixels = pixels + tf.where(counted, tf.maximum(canvas, frame_width * frame_height),
                                   tf.zeros_like(pixels))
        first_end = tf.where(tf.logical_and(tf.logical_and(counted, complete), first_end < 0),
                             image_end, first_end)
        return (block_end, blocks + 1, frames, pixels, first_end, largest_width, largest_height,
                tf.cast(new_status, tf.int64))

    zero = tf.constant(0, tf.int64)
    _, blocks, frames, pixels, first_end, largest_width, largest_height, status = tf.while_loop(
        lambda *state: tf.equal(state[-1], _RUNNING), body,
        [start, zero, zero, zero, tf.constant(-1, tf.int64), zero, zero,
         tf.constant(_RUNNING, tf.int64)])
    checks = [
        _fail_unless(tf.not_equal(status, _TRUNCATED), name, "truncated GIF (", n, " bytes; its "
                     "first frame is incomplete)"),
        _fail_unless(tf.not_equal(status, _CORRUPT), name, "corrupt GIF (no image descriptor, "
                     "extension or trailer where a block starts)"),
        _fail_unless(tf.not_equal(status, _TOO_MANY_BLOCKS), name, "GIF of more than ",
                     MAX_GIF_BLOCKS, " blocks (extensions and frames); refused before decoding"),
    ]
    with tf.control_dependencies(checks):
        return _sized(tf.identity(height), width, frames, pixels, first_end,
                      frame=(largest_width, largest_height))


def _size_and_cut(contents, name):
    """int64 `(5,)`: height, width, frames, pixels, bytes to decode; and the format code."""
    contents = tf.convert_to_tensor(contents, tf.string)
    head, n = _head(contents)
    code = _format(head)
    known = _fail_unless(code != _UNKNOWN, name, "not a JPEG, PNG, GIF or BMP file (", n,
                         " bytes); refused before decoding")
    with tf.control_dependencies([known]):
        code = tf.identity(code)
    size = tf.switch_case(code, [
        lambda: _jpeg_size(contents, n, name),
        lambda: _png_size(head, n, name),
        lambda: _gif_size(contents, head, n, name),
        lambda: _bmp_size(head, n, name),
        lambda: _sized(*[tf.constant(0, tf.int64)] * 5),
    ])
    return size, code


def image_size(contents, name="image"):
    """Reads the size of an encoded JPEG, PNG, GIF or BMP image from its header, without decoding.

    Args:
        contents: scalar string tensor (or bytes). The encoded file.
        name: str or scalar string tensor. Names the image in error messages.

    Returns:
        int64 tensor `(4,)`: `height, width, frames, pixels`. For a GIF, `height, width` are the
        logical screen's, `frames` the number of images and `pixels` the sum over the frames of
        the larger of the screen and the frame; otherwise `frames = 1`, `pixels = height * width`.

    Raises:
        tf.errors.InvalidArgumentError: not one of the four formats, a header too short to hold
            the size, a corrupt PNG IHDR, a GIF truncated before its first frame is complete or
            with more than `MAX_GIF_BLOCKS` blocks, a JPEG whose marker segments do not lead to
            a frame header (or more than `MAX_JPEG_SEGMENTS` of them). The message names the
            image (`name`) and the fault.
    """
    if tf.executing_eagerly():  # one graph: the GIF and JPEG walks are while loops
        return _graph("size")(contents, name)
    return _size_and_cut(contents, name)[0][:4]


def _libjpeg_size(contents, size):
    """`_sized` with libjpeg's reading of the height and width (the walk's components)."""
    shape = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)
    return _sized(shape[0], shape[1], tf.constant(1, tf.int64), shape[0] * shape[1], size[4],
                  size[6])


def _check(size, max_pixels, name):
    height, width, frames, pixels = size[0], size[1], size[2], size[3]
    charged, components = size[5], size[6]
    limit = tf.cast(max_pixels, tf.int64)
    charge_text = tf.where(components > 0, tf.strings.join([
        ", a progressive JPEG with ", tf.strings.as_string(components),
        tf.where(tf.equal(components, 1), " component", " components"), ": charged as ",
        tf.strings.as_string(charged), " pixels (its decoder buffers 2 bytes per component and "
        "pixel)"]), "")
    frame_width, frame_height = size[7], size[8]
    larger_frame = tf.where(frame_width > 0, tf.strings.join([
        " (", tf.where(tf.equal(frames, 1), "a frame of ", "frames up to "),
        tf.strings.as_string(frame_width), " x ", tf.strings.as_string(frame_height),
        " pixels, larger than the screen)"]), "")
    frame_text = tf.strings.join([larger_frame, " x ", tf.strings.as_string(frames),
                                  tf.where(tf.equal(frames, 1), " frame", " frames")])
    return [
        _fail_unless(pixels > 0, name, width, " x ", height, " pixels: an image without pixels; "
                     "refused"),
        _fail_unless(charged <= limit, name, width, " x ", height, " pixels", frame_text, " = ",
                     pixels, " pixels", charge_text, ", over the limit of ", limit,
                     " pixels (max_image_pixels); refused before decoding"),
    ]


def check_image(contents, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, name="image"):
    """Refuses an encoded image whose header says it has more than `max_pixels` pixels (or none).

    Args:
        contents: scalar string tensor (or bytes). The encoded file.
        max_pixels: int or int64 scalar tensor. The pixel budget (all frames of a GIF together).
        name: str or scalar string tensor. Names the image in error messages.

    Returns:
        int64 tensor `(4,)`: `height, width, frames, pixels` (see `image_size`).

    Raises:
        tf.errors.InvalidArgumentError: over the budget or without pixels (the message names the
            size and the limit), or any error of `image_size`.
    """
    if tf.executing_eagerly():
        return _graph("check")(contents, max_pixels, name)
    size, _ = _size_and_cut(contents, name)
    with tf.control_dependencies(_check(size, max_pixels, name)):
        return tf.identity(size[:4])


def decode_image(contents, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, channels=3, name="image"):
    """Decodes a JPEG, PNG, GIF or BMP file after checking its size against `max_pixels`.

    The same pixels as `tf.io.decode_image(contents, channels, expand_animations=False)`, but
    nothing is decoded before the header check passes, and a GIF is cut after its first frame
    (the only one decoded).

    Args:
        contents: scalar string tensor (or bytes). The encoded file.
        max_pixels: int or int64 scalar tensor. The pixel budget (all frames of a GIF together).
        channels: int. 3 (RGB, the default: grayscale and RGBA are converted), 0, 1 or 4, as for
            `tf.io.decode_image`.
        name: str or scalar string tensor. Names the image in error messages.

    Returns:
        uint8 tensor `(H, W, channels)`.

    Raises:
        tf.errors.InvalidArgumentError: refused by `check_image` (the message names the size and
            the limit), or the decoder's error for data that does not decode.
    """
    if tf.executing_eagerly():
        return _graph("decode", channels)(contents, max_pixels, name)
    contents = tf.convert_to_tensor(contents, tf.string)
    size, code = _size_and_cut(contents, name)
    checks = _check(size, max_pixels, name)
    with tf.control_dependencies(checks):
        # libjpeg's own reading of a JPEG header, compared with the limit too (after the walk's
        # check passed, so that extract_jpeg_shape never sees an oversized header).
        libjpeg_size = tf.cond(tf.equal(code, _JPEG), lambda: _libjpeg_size(contents, size),
                               lambda: size)
    with tf.control_dependencies(_check(libjpeg_size, max_pixels, name)):
        first_frame = tf.strings.substr(contents, tf.constant(0, tf.int64), size[4])
        data = tf.cond(tf.equal(code, _GIF),
                       lambda: tf.strings.join([first_frame, _GIF_TRAILER]),
                       lambda: tf.identity(contents))
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels or None])
    return image


def decode_images(image_bytes, size, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, name="image_bytes"):
    """Decodes a batch of encoded images one at a time, resized to `size` (bilinear, float32).

    Each image is checked with `check_image` before it is decoded, and only one image is decoded
    at a time: the memory of the batch is that of its resized images plus one decoded image.

    Args:
        image_bytes: string tensor `(N,)`.
        size: `(height, width)` of the output.
        max_pixels: int or int64 scalar tensor. The pixel budget of each image.
        name: str. Names the input in error messages: image `i` is `name[i]`.

    Returns:
        float32 tensor `(N, height, width, 3)`, RGB in [0, 255].

    Raises:
        tf.errors.InvalidArgumentError: the first image refused (the message names its index,
            size and the limit) or that does not decode; the batch fails as a whole.
    """
    height, width = size

    def one(args):
        contents, index = args
        label = tf.strings.format(name + "[{}]", index)
        image = decode_image(contents, max_pixels, channels=3, name=label)
        return tf.image.resize(image, (height, width), method="bilinear")

    indices = tf.range(tf.size(image_bytes, out_type=tf.int64))
    return tf.map_fn(one, (image_bytes, indices), parallel_iterations=1,
                     fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32))


_GRAPHS = {}


def _graph(kind, channels=None):
    """The `tf.function` that runs `image_size`, `check_image` or `decode_image` for eager callers
    (traced once per kind and channel count)."""
    key = (kind, channels)
    if key not in _GRAPHS:
        string, int64 = tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int64)
        if kind == "size":
            _GRAPHS[key] = tf.function(image_size, input_signature=[string, string], autograph=False)
        elif kind == "check":
            _GRAPHS[key] = tf.function(check_image, input_signature=[string, int64, string],
                                         autograph=False)
        else:
            _GRAPHS[key] = tf.function(
                lambda contents, max_pixels, name: decode_image(contents, max_pixels, channels,
                                                                name),
                input_signature=[string, int64, string], autograph=False)
    function = _GRAPHS[key]
    return lambda *args: function(*[tf.convert_to_tensor(a, s.dtype)
                                    for a, s in zip(args, function.input_signature)])


_ASSERT_MESSAGE = re.compile(r"assertion failed: \[(.*)\]\s*$", re.M)


def refusal_reason(error):
    """The one-line message of a refusal by this module, or None for other errors.

    Args:
        error: `tf.errors.InvalidArgumentError` (or its message, str), raised eagerly or by a
            graph (a loaded SavedModel's signature).

    Returns:
        str such as `"image: 20000 x 20000 pixels x 1 frame = 400000000 pixels, over the limit
        of 100000000 pixels (max_image_pixels); refused before decoding"`, or None.
    """
    message = getattr(error, "message", str(error))
    match = _ASSERT_MESSAGE.search(message)
    if not match:
        return None
    return " ".join(match.group(1).split())
