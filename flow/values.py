"""Values nodes return besides arrays, and how they are keyed.

A :class:`Blob` is opaque bytes (a serialized index, an ONNX model) that the
store keeps as a plain file beside an object's arrays.  It lives in its own
module because the store, which may import only flow's keys, errors and
values, must recognise it.
"""

from __future__ import annotations

from dataclasses import dataclass

from flow.keys import bytes_key, register

__all__ = ["Blob"]


@dataclass(frozen=True, slots=True, eq=False)
class Blob:
    """Opaque bytes a node returns as-is, e.g. a serialized index or model.

    Stored as a plain file beside the object's arrays, so readers can map it
    without zarr (annoy memory-maps its index file this way).
    """

    data: bytes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blob) and self.data == other.data

    def __hash__(self) -> int:
        return hash(self.data)

    def __len__(self) -> int:
        return len(self.data)


@register(Blob)
def _encode_blob(value: Blob, out: list) -> None:
    out.append(b"B" + bytes(bytes_key(value.data)))
