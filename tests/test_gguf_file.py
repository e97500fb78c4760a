"""Our GGUF header parser agrees with gguf-py's reader, and a damaged header is always one UserError."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from abliterate.ablate.gguf_file import read_part
from abliterate.cli import UserError
from tests.gguf_fixtures import llama_tensors, write_gguf


def test_parser_agrees_with_gguf_reader(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", llama_tensors(64, 2, 128, 300, Q.Q8_0), 64, 2, 128, 300,
                      alignment=64)
    part, reader = read_part(path), GGUFReader(str(path))
    assert part.alignment == 64 and part.data_start == reader.data_offset
    assert [(t.name, t.type_id, t.ne, t.nbytes, part.data_start + t.offset) for t in part.tensors] == \
        [(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.n_bytes), t.data_offset)
         for t in reader.tensors]
    assert list(part.fields) == [k for k in reader.fields if not k.startswith("GGUF.")]
    assert [off for _, off in part.kv_offsets] == [f.offset for k, f in reader.fields.items()
                                                   if not k.startswith("GGUF.")]
    assert part.fields["general.architecture"] == "llama" and part.fields["llama.block_count"] == 2
    assert part.fields["test.ints"] == [3, 1, 4, 1, 5]
    assert part.fields["tokenizer.ggml.tokens"] == ("array", 300)  # long arrays are skipped, not decoded


def test_every_cut_in_the_header_is_one_user_error(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", llama_tensors(64, 1, 128, 16, Q.F16), 64, 1, 128, 16)
    data = path.read_bytes()
    end = read_part(path).data_start
    cut = tmp_path / "cut.gguf"
    for n in list(range(0, end, 41)) + [end, len(data) - 1]:
        cut.write_bytes(data[:n])
        with pytest.raises(UserError, match="not a readable GGUF file"):
            read_part(cut)
