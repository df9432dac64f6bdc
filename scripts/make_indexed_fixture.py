"""Writes small Megatron indexed-dataset fixtures straight from the format's definition.

The Rust reader and writer are tested against these bytes, so this script must not use origami.
Layout of PREFIX.idx (little-endian, no padding):
  magic b"MMIDIDX\\x00\\x00" | version u64 = 1 | dtype code u8 | sequence count u64 S |
  document-index count u64 D | S x int32 lengths | S x int64 byte pointers | D x int64 doc indices
PREFIX.bin: every sequence's tokens back to back, in the dtype (code 8 = uint16, 4 = int32).

Run from the repository root: python3 scripts/make_indexed_fixture.py
"""
import json
import struct
from pathlib import Path

import numpy as np

OUT = Path("crates/origami-data/tests/fixtures")

# Each document is a list of sequences (lists of token ids).
DOCUMENTS = {
    "uint16": (8, np.uint16, [[[1, 2, 3]], [[10, 65000], [42]], [[]], [[7, 8, 9, 256]]]),
    "int32": (4, np.int32, [[[70000, 1]], [[5], [6, 7, 8]], [[2147483000]]]),
}


def write(name, code, dtype, documents):
    sequences = [np.array(s, dtype=dtype) for doc in documents for s in doc]
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(sequences), dtype=np.int64)
    pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64) * itemsize)
    doc_indices = np.array([0] + list(np.cumsum([len(d) for d in documents])), dtype=np.int64)
    with open(OUT / f"{name}.bin", "wb") as f:
        for s in sequences:
            f.write(s.tobytes())
    with open(OUT / f"{name}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sequences)))
        f.write(struct.pack("<Q", len(doc_indices)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(doc_indices.astype("<i8").tobytes())
    return {"dtype_code": code, "documents": documents}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    expected = {name: write(name, code, dtype, docs) for name, (code, dtype, docs) in DOCUMENTS.items()}
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
