"""Reading a browser's PNG screenshot without an imaging library: enough to count the
pixels of a colour (8-bit RGB or RGBA, not interlaced: what chromium writes)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path


def pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of raw RGB(A) bytes) of a PNG file."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    offset, idat = 8, b""
    width = height = channels = 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, "unsupported PNG"
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                line[i] = (line[i] + predictor) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, [r if channels == 3 else _rgb(r) for r in rows]


def _rgb(row: bytes) -> bytes:
    return bytes(b for i, b in enumerate(row) if i % 4 != 3)


def count_pixels(
    path: Path, box: tuple[float, float, float, float], test: Callable[[int, int, int], bool]
) -> int:
    """Pixels inside ``box`` (x, y, width, height, in screenshot pixels) whose (r, g, b)
    passes ``test``."""
    width, height, rows = pixels(path)
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    x1, y1 = min(int(box[0] + box[2]), width), min(int(box[1] + box[3]), height)
    found = 0
    for y in range(y0, y1):
        row = rows[y]
        for x in range(x0, x1):
            if test(row[3 * x], row[3 * x + 1], row[3 * x + 2]):
                found += 1
    return found


def bluish(r: int, g: int, b: int) -> bool:
    """The console's accent (#2156a5) at any opacity over white: blue well above red."""
    return b - r >= 25
