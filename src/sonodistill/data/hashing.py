"""Frame fingerprints: an exact pixel hash and a 64-bit perceptual hash (imagehash.phash).

The perceptual hash is stored as 16 hex digits; two frames are near duplicates when the Hamming
distance between their hashes is at most a threshold (0 = same hash). Resizing and JPEG
re-encoding move a phash by a few bits, a different ultrasound frame by tens of bits.
"""

from __future__ import annotations

import hashlib

import numpy as np


def pixel_sha1(grey: np.ndarray) -> str:
    """Exact fingerprint of a grey frame: SHA-1 of its shape and pixel bytes."""
    h = hashlib.sha1(f"{grey.shape}".encode())
    h.update(np.ascontiguousarray(grey).tobytes())
    return h.hexdigest()


def phash(grey: np.ndarray) -> str:
    """64-bit DCT perceptual hash of a grey uint8 frame, as 16 hex digits."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(grey), hash_size=8))


def hex_to_uint64(hashes) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def hex_to_bits(hashes) -> np.ndarray:
    """Hex hashes as bool vectors of 64 bits (fast in-clip comparisons)."""
    values = hex_to_uint64(hashes)
    return np.unpackbits(values.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1).astype(bool)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two uint64 hash vectors, shape (len(a), len(b))."""
    x = np.bitwise_xor(a[:, None], b[None, :])
    return _popcount(x)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int16)
    out = np.zeros(x.shape, dtype=np.int16)  # numpy < 2: byte-wise table
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int16)
    for shift in range(0, 64, 8):
        out += table[((x >> np.uint64(shift)) & np.uint64(255)).astype(np.intp)]
    return out
