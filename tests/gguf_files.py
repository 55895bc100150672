"""GGUF test files made from the bundled model with the ``gguf`` package itself (no
llama.cpp needed): the same metadata and tokenizer, chosen linear layers requantized to
other block types by ``gguf.quants.quantize`` (which implements Q4_0, Q4_1, Q5_0, Q5_1
and Q8_0; the K-quants it can only read)."""

from __future__ import annotations

import re
from typing import Callable, Optional

_LINEAR = re.compile(r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def requantize_gguf(src: str, dst: str, type_for_layer: Callable[[int, str], Optional[str]],
                    embedding: Optional[str] = None, untie: bool = False) -> None:
    """Write a copy of GGUF file ``src`` to ``dst`` in which linear weight
    ``blk.<i>.<kind>.weight`` is re-encoded as GGUF type ``type_for_layer(i, kind)``
    (from its ``gguf.quants.dequantize`` float32 values), or copied as it is for None.
    ``embedding``: ``token_embd.weight`` re-encoded as that type too; ``untie``: an
    ``output.weight`` (LM head) added, a byte copy of the source's ``token_embd.weight``
    (the model is then untied). Everything else (metadata, tokenizer, norms, embedding)
    is copied byte for byte. About 3 s for the bundled model."""
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        vt = f.types[0]
        writer.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        m = _LINEAR.match(t.name)
        type_name = type_for_layer(int(m.group(1)), m.group(2)) if m else None
        if t.name == "token_embd.weight":
            type_name = embedding
            if untie:
                writer.add_tensor("output.weight", t.data, raw_dtype=t.tensor_type)
        if type_name is None:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        else:
            qt = gguf.GGMLQuantizationType[type_name]
            writer.add_tensor(t.name, quantize(dequantize(t.data, t.tensor_type), qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
