"""Our Q8_0 decoder gives gguf-py's values; the types we decode, encode and fall back from."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from abliterate.ablate import gguf_codec


def test_q8_0_decoder_equals_gguf_py():
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    raw = quantize(x, Q.Q8_0)
    ours = gguf_codec.decode_rows(raw, int(Q.Q8_0), 256)
    np.testing.assert_array_equal(ours, dequantize(raw, Q.Q8_0))


def test_encode_then_decode_keeps_values_on_the_grid():
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    for qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.MXFP4):
        once = gguf_codec.decode_rows(np.frombuffer(gguf_codec.encode_rows(x, int(qtype)), np.uint8), int(qtype), 64)
        twice = gguf_codec.decode_rows(np.frombuffer(gguf_codec.encode_rows(once, int(qtype)), np.uint8),
                                       int(qtype), 64)
        np.testing.assert_array_equal(once, twice, err_msg=qtype.name)


def test_which_types_are_decoded_encoded_or_written_as_q8_0():
    assert gguf_codec.written_type(int(Q.Q8_0)) == int(Q.Q8_0)
    assert gguf_codec.written_type(int(Q.MXFP4)) == int(Q.MXFP4)
    assert gguf_codec.can_decode(int(Q.IQ4_NL)) and gguf_codec.written_type(int(Q.IQ4_NL)) == int(Q.Q8_0)
    assert not gguf_codec.can_decode(int(Q.Q8_1)) and not gguf_codec.can_decode(int(Q.I32))
