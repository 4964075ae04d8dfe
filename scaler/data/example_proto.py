"""tf.train.Example without TensorFlow: the record format of ArrayRecord image datasets.

TFDS and most grain pipelines store an image dataset as serialised tf.train.Example
protos (an encoded image under "image", an int64 "label"). The five message types are
declared here into a private descriptor pool, so the real protobuf parser reads them,
and files written by `scaler data convert` read anywhere those protos are read.
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def _example_class():
  F = descriptor_pb2.FieldDescriptorProto
  fd = descriptor_pb2.FileDescriptorProto(name="scaler/example.proto", package="tensorflow",
                                          syntax="proto3")

  def message(name, *fields):
    m = fd.message_type.add(name=name)
    for field_name, number, kind, type_name in fields:
      f = m.field.add(name=field_name, number=number, type=kind, label=F.LABEL_OPTIONAL)
      if type_name:
        f.type_name = type_name
    return m

  for name, kind in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT),
                     ("Int64List", F.TYPE_INT64)):
    message(name, ("value", 1, kind, None)).field[0].label = F.LABEL_REPEATED
  feature = message("Feature", ("bytes_list", 1, F.TYPE_MESSAGE, ".tensorflow.BytesList"),
                    ("float_list", 2, F.TYPE_MESSAGE, ".tensorflow.FloatList"),
                    ("int64_list", 3, F.TYPE_MESSAGE, ".tensorflow.Int64List"))
  feature.oneof_decl.add(name="kind")
  for f in feature.field:
    f.oneof_index = 0
  features = message("Features", ("feature", 1, F.TYPE_MESSAGE, ".tensorflow.Features.FeatureEntry"))
  features.field[0].label = F.LABEL_REPEATED
  entry = features.nested_type.add(name="FeatureEntry")
  entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                  type_name=".tensorflow.Feature")
  entry.options.map_entry = True
  message("Example", ("features", 1, F.TYPE_MESSAGE, ".tensorflow.Features"))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fd)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _example_class()


def encode(image: bytes, label: int | None = None, key: str = "image",
           label_key: str = "label") -> bytes:
  e = Example()
  e.features.feature[key].bytes_list.value.append(image)
  if label is not None:
    e.features.feature[label_key].int64_list.value.append(int(label))
  return e.SerializeToString()


def decode(record: bytes):
  """{feature name: list of values}; a ValueError for bytes that are not an Example."""
  try:
    e = Example.FromString(record)
  except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
    raise ValueError(f"not a tf.train.Example ({err})") from None
  out = {}
  for name, feature in e.features.feature.items():
    kind = feature.WhichOneof("kind")
    out[name] = list(getattr(feature, kind).value) if kind else []
  return out
