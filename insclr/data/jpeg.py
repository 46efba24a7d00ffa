"""A cheap structural check of a stored JPEG, run on every sample before DALI's decoder sees it.

Why: DALI 2.4's CPU image decoder parses the headers of a batch in parallel once it has more
than 4 × (threads + 1) samples, and a header that fails to parse in one of its pool threads
kills the process (SIGSEGV in ImageDecoder<CPUBackend>; the same sample parsed by the calling
thread, or in a small batch, gives a Python exception). Bytes that are not a JPEG (an index
file swapped with another shard's, offsets into the wrong place) or a damaged header are that
case; a header whose frame size was damaged decodes instead into a huge image (30000² took
8 GB and a minute). So every sample must start with a well-formed header whose frame size is
the one the manifest recorded, and must end with an end-of-image marker. Damage inside the
entropy-coded data passes this check; DALI reports it as a normal decode error.
"""

# Start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset({0x01}) | frozenset(range(0xD0, 0xD8))  # TEM, RST0-7 (no length field)


def jpeg_problem(data, width, height):
    """None if `data` (bytes) is a JPEG of `width` x `height` pixels with a well-formed header and
    an end-of-image marker; else what is wrong with it (one short sentence)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return f"not a JPEG (starts with {bytes(data[:4]).hex() or 'nothing'})"
    pos, frame = 2, None
    while True:
        if pos + 4 > n:
            return "JPEG header cut short"
        if data[pos] != 0xFF:
            return f"JPEG header damaged at byte {pos} (no marker where one must be)"
        while pos < n - 1 and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        marker, pos = data[pos + 1], pos + 2
        if marker in _STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9):
            return f"JPEG header damaged at byte {pos - 2} (marker ff{marker:02x} inside the header)"
        if pos + 2 > n:
            return "JPEG header cut short"
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > n:
            return f"JPEG header damaged at byte {pos} (segment ff{marker:02x} of length {length} runs past the end)"
        if marker in _SOF:
            if length < 8:
                return f"JPEG frame header damaged (length {length})"
            h, w, components = (data[pos + 3] << 8) | data[pos + 4], (data[pos + 5] << 8) | data[pos + 6], data[pos + 7]
            if (w, h) != (width, height):
                return f"JPEG frame header says {w}x{h} pixels, the manifest {width}x{height} (damaged header)"
            if components not in (1, 3) or length != 8 + 3 * components:
                return f"JPEG frame header damaged ({components} components, length {length})"
            frame = marker
        elif marker == 0xDA:  # start of scan: the header is complete
            if frame is None:
                return "JPEG has no frame header before its image data (damaged header)"
            if data.rfind(b"\xff\xd9", pos) < 0:
                return "JPEG image data cut short (no end-of-image marker)"
            return None
        pos += length
