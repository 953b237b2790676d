"""``tf.train.Example`` without TensorFlow: the same message, built from its schema by ``protobuf``.

The pairs job's workers write every record as a serialized ``tf.train.Example``. Importing
TensorFlow only for its generated message class cost each worker seconds of start-up, so this
module declares the same schema (``tensorflow/core/example/example.proto`` and ``feature.proto``:
field numbers, types, packed repeated scalars, the ``feature`` map) in a private descriptor pool
and lets the installed ``protobuf`` runtime, the one TensorFlow's own class runs on, generate the
class. Its ``SerializeToString`` gives the same bytes as ``tf.train.Example``'s
(``tests/test_example_proto.py`` checks every feature kind, and whole pair shards); the package name
differs (``dssm_example``) so the pool never clashes with TensorFlow's when both are loaded.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["Example"]

_PACKAGE = "dssm_example"
_F = descriptor_pb2.FieldDescriptorProto


def _field(message: Any, name: str, number: int, kind: int, *, repeated: bool = False, type_name: str = "",
           oneof: int | None = None, packed: bool = False) -> None:
    field = message.field.add(name=name, number=number, type=kind,
                              label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name:
        field.type_name = f".{_PACKAGE}.{type_name}"
    if oneof is not None:
        field.oneof_index = oneof
    if packed:
        field.options.packed = True


def _schema() -> descriptor_pb2.FileDescriptorProto:
    schema = descriptor_pb2.FileDescriptorProto(name="dssm_example/example.proto", package=_PACKAGE, syntax="proto3")
    for name, kind in (("BytesList", _F.TYPE_BYTES), ("FloatList", _F.TYPE_FLOAT), ("Int64List", _F.TYPE_INT64)):
        _field(schema.message_type.add(name=name), "value", 1, kind, repeated=True, packed=kind != _F.TYPE_BYTES)
    feature = schema.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate((("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                                ("int64_list", "Int64List")), start=1):
        _field(feature, name, number, _F.TYPE_MESSAGE, type_name=type_name, oneof=0)
    features = schema.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_MESSAGE, type_name="Feature")
    _field(features, "feature", 1, _F.TYPE_MESSAGE, repeated=True, type_name="Features.FeatureEntry")
    _field(schema.message_type.add(name="Example"), "features", 1, _F.TYPE_MESSAGE, type_name="Features")
    return schema


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_schema())
# Example() is an empty message with tf.train.Example's fields (example.features.feature[key]...).
Example: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.Example"))
