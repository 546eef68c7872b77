"""The committed stubs are what protos/run_codegen.py makes from the committed .proto files."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "protos"


def test_generated_stubs_are_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("run_codegen", ROOT / "run_codegen.py")
    codegen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codegen)
    codegen.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "codegen produced nothing"
    for rel in fresh:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed: run `make protos`"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run `make protos`"


def test_stubs_import_without_torch():
    """The API package is what the light client needs: it must not pull in torch."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "from copl.v1 import graph_pb2, graph_pb2_grpc, reward_pb2, reward_pb2_grpc\n"
            "assert reward_pb2.ScoreRequest(user_id='u', prompt='p', responses=['a']).WhichOneof('user') == 'user_id'")
    subprocess.run([sys.executable, "-c", code], check=True)
