"""Writing TFRecord shards from lists of records (one Beam element per chunk, not per record).

:class:`WriteTFRecords` writes the same files as ``beam.io.WriteToTFRecord`` (same framing: length,
masked CRC-32C of the length, the record, masked CRC-32C of the record; same shard names and
compression) but each input element may be a list of serialized records, written in order with one
file write. The pairs job emits one list per chunk and split, so the runner's per-element work
happens per chunk. A plain ``bytes`` element is one record.
"""

from __future__ import annotations

import struct
from typing import Any

import apache_beam as beam
from apache_beam import coders
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes

try:  # the C implementation Beam itself prefers
    from google_crc32c import value as _crc32c
except ImportError:  # pragma: no cover - Beam's fallback chain (snappy, crcmod)
    from apache_beam.io.tfrecordio import _default_crc32c_fn as _crc32c

__all__ = ["WriteTFRecords", "frame_record"]

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _masked_crc(data: bytes) -> bytes:
    crc = _crc32c(data)
    return _CRC.pack((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_record(record: bytes) -> bytes:
    """One record in TFRecord framing (what ``tf.io.TFRecordWriter`` writes for it)."""
    length = _LENGTH.pack(len(record))
    return b"".join((length, _masked_crc(length), record, _masked_crc(record)))


class _TFRecordListSink(filebasedsink.FileBasedSink):
    def __init__(self, *, file_path_prefix: str, file_name_suffix: str, num_shards: int,
                 shard_name_template: str | None, compression_type: str) -> None:
        super().__init__(file_path_prefix=file_path_prefix, coder=coders.BytesCoder(),
                         file_name_suffix=file_name_suffix, num_shards=num_shards,
                         shard_name_template=shard_name_template, mime_type="application/octet-stream",
                         compression_type=compression_type)

    def write_record(self, file_handle: Any, value: bytes | list[bytes]) -> None:
        records = [value] if isinstance(value, bytes) else value
        file_handle.write(b"".join(map(frame_record, records)))


class WriteTFRecords(beam.PTransform):
    """``beam.io.WriteToTFRecord`` for elements that are serialized records or lists of them.

    Args:
        file_path_prefix: shard path prefix (e.g. ``out/train``).
        file_name_suffix: e.g. ``.tfrecord.gz``.
        num_shards: 0 lets the runner choose.
        shard_name_template: Beam's shard name template.
        compression_type: a ``CompressionTypes`` value (default: from the suffix).
    """

    def __init__(self, file_path_prefix: str, *, file_name_suffix: str = "", num_shards: int = 0,
                 shard_name_template: str | None = None,
                 compression_type: str = CompressionTypes.AUTO) -> None:
        super().__init__()
        self._sink = _TFRecordListSink(file_path_prefix=file_path_prefix, file_name_suffix=file_name_suffix,
                                       num_shards=num_shards, shard_name_template=shard_name_template,
                                       compression_type=compression_type)

    def expand(self, pcoll: beam.PCollection) -> Any:
        return pcoll | beam.io.Write(self._sink)
