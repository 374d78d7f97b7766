"""Generate the Python wire stubs in topd_client/wire from proto/ (the one source of truth).

    python scripts/gen_proto.py          # regenerate
    python scripts/gen_proto.py --check  # exit 1 when the checked-in stubs drift from the .proto

protoc writes absolute imports (`from topd.v1 import common_pb2`); they are rewritten to live under
`topd_client.wire` so the stubs ship inside the SDK package.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "topd_client" / "wire"
PACKAGE = "topd_client.wire"


def _generate_into(out: Path) -> None:
    from grpc_tools import protoc  # dev dependency
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        text = re.sub(r"^from topd\.v1 import", f"from {PACKAGE}.topd.v1 import", text, flags=re.M)
        path.write_text(text)
    for pkg in [out / "topd", out / "topd" / "v1"]:
        (pkg / "__init__.py").write_text("")


def _tree(root: Path) -> dict[str, str]:
    """Every generated file under root/topd, by relative path."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted((root / "topd").rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        _generate_into(fresh)
        if args.check:
            want = _tree(fresh)
            have = _tree(OUT_DIR)
            drift = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            if drift:
                print("wire stubs drift from proto/: " + ", ".join(drift) + "\nrun: python scripts/gen_proto.py", file=sys.stderr)
                return 1
            print("wire stubs match proto/")
            return 0
        shutil.copytree(fresh / "topd", OUT_DIR / "topd", dirs_exist_ok=True)
    print(f"wrote stubs to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
