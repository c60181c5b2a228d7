"""The demo's reward curve as a small PNG, drawn without a plotting library (stdlib zlib + struct only).

Mean reward per step on a 0..1 vertical axis with grid lines at 0.25 steps, one point per step joined
by a line; the file is written atomically (temp name, then rename).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 480, 240, 24
BACKGROUND, AXIS, GRID, LINE = (255, 255, 255), (40, 40, 40), (220, 220, 220), (31, 119, 180)


def _png(pixels: list[bytearray]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    header = struct.pack(">IIBBBBB", WIDTH, HEIGHT, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def reward_png(rewards: list[float]) -> bytes:
    """PNG bytes of the reward curve (rewards are clipped to 0..1)."""
    pixels = [bytearray(BACKGROUND * WIDTH) for _ in range(HEIGHT)]

    def put(x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < WIDTH and 0 <= y < HEIGHT:
            pixels[y][3 * x : 3 * x + 3] = bytes(color)

    left, right, top, bottom = MARGIN, WIDTH - MARGIN, MARGIN, HEIGHT - MARGIN
    for quarter in range(5):
        y = bottom - round(quarter / 4 * (bottom - top))
        for x in range(left, right + 1):
            put(x, y, AXIS if quarter == 0 else GRID)
    for y in range(top, bottom + 1):
        put(left, y, AXIS)
    points = []
    for i, reward in enumerate(rewards):
        x = left + (round(i / (len(rewards) - 1) * (right - left)) if len(rewards) > 1 else 0)
        y = bottom - round(min(1.0, max(0.0, reward)) * (bottom - top))
        points.append((x, y))
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for t in range(steps + 1):
            put(round(x0 + (x1 - x0) * t / steps), round(y0 + (y1 - y0) * t / steps), LINE)
    for x, y in points:
        for dx in range(-2, 3):
            for dy in range(-2, 3):
                put(x + dx, y + dy, LINE)
    return _png(pixels)


def write_reward_png(path: str | os.PathLike[str], rewards: list[float]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(reward_png(rewards))
    os.replace(tmp, target)
    return target
