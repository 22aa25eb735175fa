"""Tests of training/image_safety.py: sizes read from headers, refusals before decoding, GIF cut.

Hostile files are written byte by byte (`hostile_images.py`); ordinary files are real CIFAR-10
photos re-encoded (Pillow, which comes with matplotlib, for BMP and GIF). What each refusal costs
in memory is measured on an export in a fresh process (test_export.py).
"""

import io
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.training import hostile_images as hostile
from training import image_safety

LIMIT = image_safety.DEFAULT_MAX_IMAGE_PIXELS


@pytest.fixture(scope="module")
def photo(cifar10_small_dir):
    """A real CIFAR-10 photo: its JPEG bytes and decoded uint8 (32, 32, 3) pixels."""
    path = sorted((cifar10_small_dir / "test" / "cat").glob("*.jpg"))[0]
    jpeg = path.read_bytes()
    return jpeg, tf.io.decode_jpeg(jpeg, channels=3).numpy()


def _pil(array, fmt, **kwargs):
    image = pytest.importorskip("PIL.Image")
    out = io.BytesIO()
    frames = [image.fromarray(a) for a in (array if isinstance(array, list) else [array])]
    frames[0].save(out, fmt, save_all=len(frames) > 1, append_images=frames[1:], **kwargs)
    return out.getvalue()


def _refusal(contents, max_pixels=LIMIT, name="image"):
    """The refusal message of `check_image` (fails the test if the file passes)."""
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        image_safety.check_image(contents, max_pixels, name=name)
    return image_safety.refusal_reason(error.value)


def test_sizes_from_headers_match_the_decoded_images(photo):
    jpeg, pixels = photo
    wide = np.concatenate([pixels, pixels[:, :13]], axis=1)  # 32 x 45: height != width
    files = {
        "jpeg": jpeg,
        "png": tf.io.encode_png(wide).numpy(),
        "png16": tf.io.encode_png(tf.cast(wide, tf.uint16) * 257).numpy(),
        "bmp": _pil(wide, "BMP"),
        "gif": _pil(wide, "GIF"),
    }
    for name, contents in files.items():
        want = tf.io.decode_image(contents, channels=3, expand_animations=False).numpy()
        size = image_safety.image_size(contents).numpy().tolist()
        assert size == [want.shape[0], want.shape[1], 1, want.shape[0] * want.shape[1]], name
        decoded = image_safety.decode_image(contents).numpy()
        assert decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, want, err_msg=name)
    # A top-down BMP stores a negative height: the size is its absolute value.
    bmp = bytearray(files["bmp"])
    assert int.from_bytes(bmp[22:26], "little", signed=True) == 32
    bmp[22:26] = (-32).to_bytes(4, "little", signed=True)
    assert image_safety.image_size(bytes(bmp)).numpy().tolist() == [32, 45, 1, 32 * 45]


def test_animated_gif_counts_every_frame_and_decodes_the_first(photo):
    _, pixels = photo
    frames = [pixels, 255 - pixels, pixels // 2]
    contents = _pil(frames, "GIF", duration=100, loop=0)
    assert image_safety.image_size(contents).numpy().tolist() == [32, 32, 3, 3 * 32 * 32]
    want = tf.io.decode_gif(contents).numpy()
    assert want.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(image_safety.decode_image(contents).numpy(), want[0])
    # The handmade bomb's structure (extensions, sub-blocks, trailer) reads the same way.
    bomb = hostile.gif_of_zeros(300, 200, frames=4)
    assert image_safety.image_size(bomb).numpy().tolist() == [200, 300, 4, 4 * 300 * 200]
    np.testing.assert_array_equal(image_safety.decode_image(bomb).numpy(),
                                  np.zeros((200, 300, 3), np.uint8))


def test_gifs_without_trailer_or_cut_after_the_first_frame_still_read():
    """Only the first frame is decoded (what that saves is measured in test_export.py): a GIF
    without its trailer (some encoders) or cut inside a later frame reads as far as it goes."""
    good = hostile.gif_frame(40, 30)
    for cut in (hostile.gif(40, 30, [good, good], trailer=False),
                hostile.gif(40, 30, [good, good])[:-20]):
        assert image_safety.image_size(cut).numpy().tolist() == [30, 40, 2, 2 * 40 * 30]
        np.testing.assert_array_equal(image_safety.decode_image(cut).numpy(),
                                      np.zeros((30, 40, 3), np.uint8))


def test_the_bombs_of_issue_21_are_refused_with_their_size_and_the_limit():
    png = hostile.png_of_zeros(20000, 20000)
    animated = hostile.gif_of_zeros(2000, 2000, frames=100)
    assert len(png) < 400_000 and len(animated) < 400_000  # what a client sends
    assert _refusal(png) == (
        "image: 20000 x 20000 pixels x 1 frame = 400000000 pixels, over the limit of 100000000 "
        "pixels (max_image_pixels); refused before decoding")
    start = time.perf_counter()
    reason = _refusal(animated, name="image_bytes[3]")
    assert time.perf_counter() - start < 2.0  # the block walk jumps over the sub-blocks
    assert reason == (
        "image_bytes[3]: 2000 x 2000 pixels x 100 frames = 400000000 pixels, over the limit of "
        "100000000 pixels (max_image_pixels); refused before decoding")
    with pytest.raises(tf.errors.InvalidArgumentError, match="over the limit of 100000000"):
        image_safety.decode_image(png)


def test_limit_is_inclusive_and_frames_larger_than_the_screen_count(photo):
    jpeg, _ = photo
    assert image_safety.check_image(jpeg, 32 * 32).numpy().tolist() == [32, 32, 1, 1024]
    assert _refusal(jpeg, 32 * 32 - 1) == (
        "image: 32 x 32 pixels x 1 frame = 1024 pixels, over the limit of 1023 pixels "
        "(max_image_pixels); refused before decoding")
    # A 1 x 1 screen with a 3000 x 2000 frame: giflib would allocate the frame's raster.
    sneaky = hostile.gif(1, 1, [hostile.gif_frame(3000, 2000)])
    assert image_safety.image_size(sneaky).numpy().tolist() == [1, 1, 1, 6_000_000]
    assert "= 6000000 pixels, over the limit of 5000000" in _refusal(sneaky, 5_000_000)


def test_jpeg_header_claiming_65535_squared_over_a_few_bytes(photo):
    jpeg, _ = photo
    claim = hostile.jpeg_claiming(jpeg, 65535, 65535)
    assert len(claim) < 1000
    assert _refusal(claim) == (
        "image: 65535 x 65535 pixels x 1 frame = 4294836225 pixels, over the limit of 100000000 "
        "pixels (max_image_pixels); refused before decoding")
    # libjpeg itself stops at 65,500 (its "Invalid JPEG data" names neither size nor limit);
    # below that, the walk of the marker segments reads the same size as libjpeg.
    assert _refusal(hostile.jpeg_claiming(jpeg, 60000, 50000)).startswith(
        "image: 50000 x 60000 pixels x 1 frame = 3000000000 pixels, over the limit")
    claim = hostile.jpeg_claiming(jpeg, 64, 48)
    assert image_safety.image_size(claim).numpy().tolist() == [64, 48, 1, 64 * 48]
    assert tf.image.extract_jpeg_shape(claim).numpy().tolist() == [64, 48, 3]
    # Claiming a size within the limit, the same few bytes are the decoder's error, not a crash.
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        image_safety.decode_image(claim)
    assert image_safety.refusal_reason(error.value) is None


@pytest.mark.parametrize("case, expected", [
    ("zero_length", "image: not a JPEG, PNG, GIF or BMP file (0 bytes); refused before decoding"),
    ("text", "image: not a JPEG, PNG, GIF or BMP file (23 bytes); refused before decoding"),
    ("webp", "image: not a JPEG, PNG, GIF or BMP file"),
    ("png_ihdr_type", "image: corrupt or truncated PNG header (no 13-byte IHDR chunk after the "
                      "signature; "),
    ("png_ihdr_length", "image: corrupt or truncated PNG header"),
    ("png_ihdr_width_2_32", "image: corrupt PNG header: IHDR width 4294967295 or height 5 is "
                            "over 2^31 - 1"),
    ("png_zero_width", "image: 0 x 5 pixels: an image without pixels; refused"),
    ("png_truncated_header", "image: corrupt or truncated PNG header (no 13-byte IHDR chunk "
                             "after the signature; 20 bytes)"),
    ("gif_truncated_header", "image: truncated GIF header (10 bytes, the logical screen "
                             "descriptor ends at byte 13)"),
    ("gif_truncated_first_frame", "image: truncated GIF ("),
    ("gif_garbage_block", "image: corrupt GIF (no image descriptor, extension or trailer where "
                          "a block starts)"),
    ("gif_no_frame", "image: 7 x 5 pixels: an image without pixels; refused"),
    ("bmp_truncated_header", "image: truncated BMP header (20 bytes, the size fields end at "
                             "byte 26)"),

    ("jpeg_truncated_header", "image: truncated JPEG header (100 bytes, no frame header)"),
    ("jpeg_scan_before_frame", "image: corrupt JPEG header (no marker segment where one starts, "
                               "or a scan before the frame header)"),
    ("jpeg_garbage", "image: corrupt JPEG header"),
])
def test_hostile_headers_are_refused_in_one_line(case, expected, photo):
    jpeg, pixels = photo
    png = tf.io.encode_png(pixels).numpy()
    files = {
        "zero_length": b"",
        "text": b"this is not an image\n\0\0",
        "webp": _pil(pixels, "WEBP"),
        "png_ihdr_type": hostile.png_with_ihdr(7, 5, kind=b"IHDX"),
        "png_ihdr_length": hostile.png_with_ihdr(7, 5, length=12),
        "png_ihdr_width_2_32": hostile.png_with_ihdr(2**32 - 1, 5),
        "png_zero_width": hostile.png_with_ihdr(0, 5),
        "png_truncated_header": png[:20],
        "gif_truncated_header": hostile.gif_of_zeros(7, 5)[:10],
        "gif_truncated_first_frame": hostile.gif_of_zeros(70, 50)[:60],
        "gif_garbage_block": hostile.gif(7, 5, [b"\x99" * 10]),
        "gif_no_frame": hostile.gif(7, 5, []),
        "bmp_truncated_header": _pil(pixels, "BMP")[:20],
        "jpeg_truncated_header": jpeg[:100],
        "jpeg_scan_before_frame": b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 20,
        "jpeg_garbage": b"\xff\xd8\xff\xe0\x00\x10JFIF\0" + b"\x12" * 40,
    }
    reason = _refusal(files[case])
    assert reason.startswith(expected), reason
    assert "\n" not in reason
    with pytest.raises(tf.errors.InvalidArgumentError, match="refused|corrupt|truncated"):
        image_safety.decode_image(files[case])


def test_corrupt_data_after_a_valid_header_is_the_decoders_error(photo):
    """A bad IHDR CRC, a truncated IDAT or JPEG scan: the size is read and within the limit, the
    decoder fails with InvalidArgumentError (at most the announced size is allocated)."""
    jpeg, pixels = photo
    png = tf.io.encode_png(pixels).numpy()
    for contents in (hostile.png_with_ihdr(7, 5, crc=0), png[:len(png) // 2],
                     jpeg[:len(jpeg) - 100], hostile.gif(7, 5, [hostile.gif_frame(
                         7, 5, lzw=hostile.gif_sub_blocks(b"\xff" * 40))])):
        assert image_safety.check_image(contents).numpy()[3] <= 32 * 32
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            image_safety.decode_image(contents).numpy()
        assert image_safety.refusal_reason(error.value) is None


def test_files_of_too_many_blocks_are_refused(monkeypatch):
    """GIFs of many empty extensions and JPEGs of many empty segments: the walks stop at their
    limits (which bound their time)."""
    monkeypatch.setattr(image_safety, "MAX_GIF_BLOCKS", 50)
    monkeypatch.setattr(image_safety, "MAX_JPEG_SEGMENTS", 20)
    monkeypatch.setattr(image_safety, "_GRAPHS", {})  # traced again with the patched limits
    comment = b"\x21\xfe\x00"  # a GIF comment extension without data
    # The NETSCAPE2.0 extension, 47 comments, the frame's graphic control extension and its
    # image are 50 blocks (the trailer ends them).
    fifty = hostile.gif(7, 5, [comment] * 47 + [hostile.gif_frame(7, 5)])
    assert image_safety.image_size(fifty).numpy().tolist() == [5, 7, 1, 35]
    assert _refusal(hostile.gif(7, 5, [comment] * 48 + [hostile.gif_frame(7, 5)])) == (
        "image: GIF of more than 50 blocks (extensions and frames); refused before decoding")

    def jpeg(segments):  # empty comment segments, then a frame header of 16 x 16
        return (b"\xff\xd8" + b"\xff\xfe\x00\x02" * segments
                + b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03" + b"\0" * 20)

    assert image_safety.image_size(jpeg(20)).numpy().tolist() == [16, 16, 1, 256]
    assert _refusal(jpeg(21)) == ("image: JPEG of more than 20 marker segments before its frame "
                                  "header; refused before decoding")


def test_decode_images_batches_and_names_the_refused_index(photo):
    jpeg, pixels = photo
    bomb = hostile.png_of_zeros(300, 300)
    batch = tf.constant([jpeg, tf.io.encode_png(pixels).numpy()])
    images = image_safety.decode_images(batch, (16, 8)).numpy()
    assert images.shape == (2, 16, 8, 3) and images.dtype == np.float32
    want = tf.image.resize(tf.io.decode_jpeg(jpeg), (16, 8)).numpy()
    np.testing.assert_allclose(images[0], want, atol=1e-4)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        image_safety.decode_images(tf.constant([jpeg, jpeg, bomb]), (16, 8), max_pixels=10_000)
    assert image_safety.refusal_reason(error.value) == (
        "image_bytes[2]: 300 x 300 pixels x 1 frame = 90000 pixels, over the limit of 10000 "
        "pixels (max_image_pixels); refused before decoding")


@pytest.mark.parametrize("value", [0, -5, 1.5, "100", True, None])
def test_max_image_pixels_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        image_safety.check_max_image_pixels(value)
    assert image_safety.check_max_image_pixels(40_000_000) == 40_000_000
    assert image_safety.check_max_image_pixels(2**63 - 1) == 2**63 - 1
    with pytest.raises(ValueError, match="max_image_pixels must be at most 9223372036854775807. "
                                         "Received: 9223372036854775808"):
        image_safety.check_max_image_pixels(2**63)


@pytest.mark.parametrize("marker", [0xC2, 0xC6, 0xCA, 0xCE])
@pytest.mark.parametrize("components", [3, 4])
def test_progressive_jpeg_is_charged_its_coefficient_buffer(components, marker):
    """libjpeg keeps a progressive JPEG's whole coefficient buffer (2 bytes per component and
    pixel) besides the 3-byte output: 10000 x 10000 decodes in +875 MB (3 components) or +1066 MB
    (CMYK), so it is charged (3 + 2 * components) / 3 times its pixels."""
    claim = hostile.jpeg_progressive(10000, 10000, components, marker)
    assert len(claim) < 200
    assert image_safety.image_size(claim).numpy().tolist() == [10000, 10000, 1, 10**8]
    charged = -(-10**8 * (3 + 2 * components) // 3)  # rounded up
    assert _refusal(claim) == (
        f"image: 10000 x 10000 pixels x 1 frame = 100000000 pixels, a progressive JPEG with "
        f"{components} components: charged as {charged} pixels (its decoder buffers 2 bytes per "
        "component and pixel), over the limit of 100000000 pixels (max_image_pixels); refused "
        "before decoding")
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"charged as {charged} pixels"):
        image_safety.decode_image(claim)
    # Within the limit once charged: the check passes (the few bytes then fail to decode).
    image_safety.check_image(claim, charged)
    assert "over the limit" in _refusal(claim, charged - 1)


def test_progressive_jpeg_that_decodes_is_charged_and_decoded(photo):
    _, pixels = photo
    image = pytest.importorskip("PIL.Image")
    buffer = io.BytesIO()
    image.fromarray(pixels).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    assert b"\xff\xc2" in data
    assert image_safety.decode_image(data, 32 * 32 * 3).shape == (32, 32, 3)
    assert "charged as 3072 pixels" in _refusal(data, 32 * 32 * 3 - 1)
    # A baseline JPEG is charged its pixels.
    assert image_safety.check_image(hostile.jpeg_progressive(100, 100, 3, 0xC0), 10000) is not None


def test_gif_refusal_names_a_frame_larger_than_the_screen():
    huge = hostile.gif(1, 1, [hostile.gif_frame(65535, 65535, lzw=b"\x01\x00\x00")])
    assert _refusal(huge) == (
        "image: 1 x 1 pixels (a frame of 65535 x 65535 pixels, larger than the screen) x 1 frame "
        "= 4294836225 pixels, over the limit of 100000000 pixels (max_image_pixels); refused "
        "before decoding")
    two = hostile.gif(1, 1, [hostile.gif_frame(3000, 2000), hostile.gif_frame(2000, 2000)])
    assert _refusal(two, 9_000_000).startswith(
        "image: 1 x 1 pixels (frames up to 3000 x 2000 pixels, larger than the screen) x 2 frames "
        "= 10000000 pixels, over the limit of 9000000")
    # Frames within the screen are not mentioned.
    assert _refusal(hostile.gif_of_zeros(2000, 2000, frames=3), 10_000_000).startswith(
        "image: 2000 x 2000 pixels x 3 frames = 12000000 pixels, over")
