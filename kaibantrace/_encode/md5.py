"""MD5 in pure Python, for the one place KaibanJS's formula needs it: the project ID.

KaibanJS's project ID is an MD5 fingerprint, and kaibantrace must compute the
same value everywhere. ``hashlib.md5(usedforsecurity=False)`` works even where
OpenSSL runs in FIPS mode on most systems; where a build refuses MD5 outright,
this module computes it instead (RFC 1321). It is slow (tens of microseconds a
call) and only ever hashes two short strings per project, so that does not
matter. It is a fingerprint here, never a security measure.
"""

from __future__ import annotations

import math
import struct

# Per-round left-rotation amounts, four rounds of sixteen steps.
_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
# The sine-derived constants: floor(abs(sin(i + 1)) * 2**32).
_CONSTANTS = [int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)]
_MASK = 0xFFFFFFFF


def _rotate(value: int, amount: int) -> int:
    value &= _MASK
    return ((value << amount) | (value >> (32 - amount))) & _MASK


def md5_hex(data: bytes) -> str:
    """The MD5 digest of ``data`` as 32 lower-case hex digits."""
    state = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476]
    # Pad to 56 bytes mod 64 with 0x80 then zeros, then the bit length, little-endian.
    message = data + b"\x80" + b"\x00" * ((55 - len(data)) % 64)
    message += struct.pack("<Q", (len(data) * 8) & 0xFFFFFFFFFFFFFFFF)
    for offset in range(0, len(message), 64):
        words = struct.unpack("<16I", message[offset:offset + 64])
        a, b, c, d = state
        for step in range(64):
            if step < 16:
                mixed, index = (b & c) | (~b & d), step
            elif step < 32:
                mixed, index = (d & b) | (~d & c), (5 * step + 1) % 16
            elif step < 48:
                mixed, index = b ^ c ^ d, (3 * step + 5) % 16
            else:
                mixed, index = c ^ (b | ~d), (7 * step) % 16
            total = a + mixed + _CONSTANTS[step] + words[index]
            a, d, c = d, c, b
            b = (b + _rotate(total, _SHIFTS[step])) & _MASK
        state = [(s + v) & _MASK for s, v in zip(state, (a, b, c, d))]
    return struct.pack("<4I", *state).hex()
