"""Decoding workers and writer threads run niced below the compute threads; the pixels
the overlay starts from are the decoder's own uint8 ones."""

from __future__ import annotations

import os
import threading

import numpy as np
from PIL import Image

from fgcli.data.decode import decode, decode_pixels
from fgcli.dump.background import BACKGROUND_NICE, lower_priority


def _nice_in_thread(fn) -> tuple[int, int]:
    seen: list[int] = []

    def body() -> None:
        tid = threading.get_native_id()
        seen.append(os.getpriority(os.PRIO_PROCESS, tid))
        fn()
        seen.append(os.getpriority(os.PRIO_PROCESS, tid))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return seen[0], seen[1]


def test_lower_priority_nices_the_calling_thread_only():
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before, after = _nice_in_thread(lower_priority)
    assert after == min(19, before + BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_writer_pool_threads_are_niced():
    from fgcli.dump.writeback import WriteBack

    pool = WriteBack(None, None, None, 2).pool  # type: ignore[arg-type]
    try:
        nice = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS,
                                                  threading.get_native_id())).result()
    finally:
        pool.shutdown()
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert nice == min(19, main + BACKGROUND_NICE)


def test_decode_pixels_gives_the_uint8_pixels_of_the_float_image(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    floats, pixels = decode_pixels(str(tmp_path / "a.png"), 10**6)
    assert np.array_equal(pixels, rgb)
    assert np.array_equal(floats, decode(str(tmp_path / "a.png"), 10**6))
    assert np.array_equal((floats * 255.0 + 0.5).astype(np.uint8), pixels)
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "b.png")  # alpha
    assert decode_pixels(str(tmp_path / "b.png"), 10**6)[1] is None
