"""Generate the Python stubs beside the .proto files (run by `make protos`).

The stubs are committed so that an install needs no code generator; tests/test_protos.py fails when
they fall out of date with the .proto files.
"""
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent


def generate(out_dir: Path = ROOT) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "copl" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
                        f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos])
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
