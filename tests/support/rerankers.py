"""A rank-pooling GGUF for the rerank tests, derived from a real BERT encoder GGUF (MiniLM).

No trained cross-encoder reranker is on the package registries these tests may reach (PyPI, npm,
Debian), so this one runs llama.cpp's real rerank path (rank pooling, a classification head, one
score per sequence) with an untrained head: `cls` the identity, `cls.output` a fixed alternating
vector. Its scores carry no relevance; the tests check the plumbing with it (pairs built as
llama-server builds them, batched scores equal to one-at-a-time ones, order and `top_n`), and
relevance with embedding models.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def rank_pooling_copy(source: Path, target: Path) -> Path:
    reader = gguf.GGUFReader(str(source))
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(str(target), arch)
    pooling_key = f"{arch}.pooling_type"
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = int(gguf.PoolingType.RANK) if field.name == pooling_key else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    if pooling_key not in reader.fields:
        writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_classifier_output_labels(["LABEL_0"])
    writer.add_description("NOT A RERANKER: an encoder with an untrained rank head, for tests")
    n_embd = int(reader.fields[f"{arch}.embedding_length"].contents())
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    alternating = np.array([1.0 if i % 2 == 0 else -1.0 for i in range(n_embd)], dtype=np.float32)
    writer.add_tensor("cls.weight", np.eye(n_embd, dtype=np.float32))
    writer.add_tensor("cls.bias", np.zeros(n_embd, dtype=np.float32))
    head = (alternating / np.float32(np.sqrt(n_embd))).astype(np.float32).reshape(1, n_embd)
    writer.add_tensor("cls.output.weight", head)
    writer.add_tensor("cls.output.bias", np.zeros(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
