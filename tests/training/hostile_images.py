"""Hostile image files for the serving and loader tests, written byte by byte (no Pillow).

- `png_of_zeros(20000, 20000)`: the decompression bomb of issue 21, an 8-bit grayscale PNG of zero
  pixels (0.39 MB that decode to 1.2 GB as RGB), deflated row by row;
- `gif_of_zeros(2000, 2000, frames=100)`: the animated bomb (0.38 MB, 100 frames of 4 megapixels),
  one LZW stream of a constant image (codes for runs of growing length) repeated per frame;
- `jpeg_claiming(jpeg, 65535, 65535)`: a real JPEG whose frame header (SOF) claims another size, cut
  a few bytes after its scan header;
- `png_with_ihdr(...)`: a PNG with chosen (possibly corrupt) IHDR fields.
"""

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind, data, crc=None):
    """One PNG chunk: length, type, data, CRC (the right one unless `crc` is given)."""
    if crc is None:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_with_ihdr(width, height, idat=b"", kind=b"IHDR", length=None, crc=None, bit_depth=8,
                  colour_type=0):
    """A PNG whose IHDR says `width x height` (`kind`, `length` and `crc` corrupt it if given)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunk = png_chunk(kind, ihdr, crc)
    if length is not None:
        chunk = struct.pack(">I", length) + chunk[4:]
    return PNG_SIGNATURE + chunk + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_of_zeros(width, height):
    """8-bit grayscale PNG of `height` rows of `width` zero pixels (rows deflated one by one)."""
    deflate = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte 0, then the pixels
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    return png_with_ihdr(width, height, idat)


def _lzw_of_zeros(pixels, min_code_size=2):
    """GIF LZW codes (packed LSB first) of `pixels` zero-valued pixels.

    On a constant image LZW's table holds the runs of length 1, 2, 3, ...: each code emitted is
    the longest run known, and adds the run one longer. The table is cleared when it is full.
    """
    clear, end = 1 << min_code_size, (1 << min_code_size) + 1
    width = min_code_size + 1
    codes = [(clear, width)]
    next_code, run, remaining = end + 1, 1, pixels
    while remaining > 0:
        take = min(run, remaining)
        codes.append((0 if take == 1 else end + take - 1, width))
        remaining -= take
        if remaining == 0:
            break
        next_code += 1  # the run of take + 1 pixels
        if next_code > (1 << width) and width < 12:
            width += 1
        run = take + 1
        if next_code >= 4096:
            codes.append((clear, width))
            width, next_code, run = min_code_size + 1, end + 1, 1
    codes.append((end, width))
    out, acc, bits = bytearray(), 0, 0
    for code, size in codes:
        acc |= code << bits
        bits += size
        while bits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            bits -= 8
    if bits:
        out.append(acc)
    return bytes(out)


def gif_sub_blocks(data, size=255):
    """`data` as GIF data sub-blocks (a length byte, up to 255 bytes), ending with a 0 byte."""
    return b"".join(bytes([len(data[i:i + size])]) + data[i:i + size]
                    for i in range(0, len(data), size)) + b"\0"


def gif_frame(width, height, lzw=None, screen=None):
    """A graphic control extension and an image of `width x height` zero pixels."""
    lzw = gif_sub_blocks(_lzw_of_zeros(width * height)) if lzw is None else lzw
    return (b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control: 0.1 s delay
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02" + lzw)


def gif(width, height, frames, trailer=True):
    """A GIF89a of logical screen `width x height`, with a black/white colour table, a looping
    (NETSCAPE2.0) extension and the given frames (bytes from `gif_frame`)."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00" + b"".join(frames)
            + (b"\x3b" if trailer else b""))


def gif_of_zeros(width, height, frames=1):
    """An animated GIF of `frames` frames of `width x height` zero (black) pixels."""
    return gif(width, height, [gif_frame(width, height)] * frames)


def jpeg_claiming(jpeg, height, width, keep_after_scan=4):
    """`jpeg` with the height and width of its frame header (SOF0/SOF2) replaced, cut
    `keep_after_scan` bytes after its start-of-scan header."""
    data = bytearray(jpeg)
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    sos = data.index(b"\xff\xda")
    header_end = sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]
    return bytes(data[:header_end + keep_after_scan])


def jpeg_progressive(height, width, components=3, marker=0xC2):
    """A hand-made JPEG of a few hundred bytes whose progressive frame header (SOF2, or `marker`)
    claims `height x width` with `components` components, each sampled 1x1 (0x11): SOI, an Adobe
    APP14 segment for 4 components (CMYK), DQT, SOF, DHT, SOS of a DC scan, 16 zero bytes, EOI."""
    def segment(code, payload):
        return bytes([0xFF, code]) + struct.pack(">H", len(payload) + 2) + payload

    adobe = segment(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0)) if components == 4 else b""
    dqt = segment(0xDB, b"\0" + b"\x01" * 64)
    sof = segment(marker, struct.pack(">BHHB", 8, height, width, components)
                  + b"".join(bytes([i + 1, 0x11, 0]) for i in range(components)))
    dht = segment(0xC4, b"\x00" + b"\x01" + b"\0" * 15 + b"\x00")
    sos = segment(0xDA, bytes([components]) + b"".join(bytes([i + 1, 0x00])
                                                         for i in range(components)) + b"\0\0\0")
    return b"\xff\xd8" + adobe + dqt + sof + dht + sos + b"\0" * 16 + b"\xff\xd9"
