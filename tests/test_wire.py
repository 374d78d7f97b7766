"""The wire contract: stubs in sync with proto/, tensor packing."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from topd_client.errors import MalformedTensorError
from topd_client.tensors import from_wire, to_wire
from topd_client.wire.topd.v1 import common_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_stubs_match_proto():
    res = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_stub_check_detects_drift(tmp_path):
    """The drift check itself must fail when a generated file differs."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    shutil.copytree(ROOT / "topd_client" / "wire", copy / "topd_client" / "wire")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    stub = copy / "topd_client/wire/topd/v1/common_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    res = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=copy, capture_output=True, text=True)
    assert res.returncode == 1 and "common_pb2.py" in res.stderr


@pytest.mark.parametrize("dtype,arr", [("float32", np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
                                       ("int32", np.array([[1, -2], [3, 2**30]], dtype=np.int32)),
                                       ("int64", np.array([2**40], dtype=np.int64))])
def test_tensor_roundtrip_little_endian(dtype, arr):
    t = to_wire(arr, dtype)
    assert t.dtype == dtype and list(t.shape) == list(arr.shape)
    assert t.data == arr.astype(np.dtype(arr.dtype).newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(from_wire(t), arr)


def test_malformed_tensor_named():
    t = common_pb2.Tensor(dtype="float32", shape=[3], data=b"\x00" * 11)
    with pytest.raises(MalformedTensorError, match="11 bytes do not fit"):
        from_wire(t, "x")
    with pytest.raises(MalformedTensorError, match="unknown dtype"):
        from_wire(common_pb2.Tensor(dtype="complex", shape=[1], data=b""), "x")


def test_model_info_is_one_record_on_both_sides():
    """The engine's record and the SDK's are the wire message's fields by name (converted generically),
    so a field added to proto/ and to them cannot be dropped on the way."""
    from dataclasses import fields

    from services.common.engine import EngineMeta
    from topd_client.results import ModelInfo

    wire = {f.name for f in common_pb2.ModelInfo.DESCRIPTOR.fields}
    assert {f.name for f in fields(ModelInfo)} == wire - {"weight_sync"}  # a nested message: the rollout SDK's
    assert {f.name for f in fields(EngineMeta)} - {"extra"} <= wire
