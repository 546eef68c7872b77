"""Release registry: immutable releases, an atomically replaced CURRENT pointer, rollback."""
import pytest

from copl_common.registry import Registry, RegistryError


def _publish(reg: Registry, payload: str, **kw):
    with reg.stage() as staged:
        (staged / "gnn").mkdir()
        (staged / "gnn" / "w.txt").write_text(payload)
        return reg.publish(staged, {"payload": payload}, **kw)


def test_publish_current_list_and_rollback(tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.current() is None and reg.list() == []
    first = _publish(reg, "one")
    second = _publish(reg, "two")
    assert reg.current().id == second.id
    assert [r.id for r in reg.list()] == sorted([first.id, second.id])
    assert (second.gnn_dir / "w.txt").read_text() == "two"
    assert reg.get(first.id).manifest["payload"] == "one"
    reg.set_current(first.id)  # rollback
    assert reg.current().id == first.id
    assert not list(reg.root.glob(".staging-*")) and not list(reg.root.glob(".CURRENT.*"))


def test_publish_without_switching(tmp_path):
    reg = Registry(tmp_path)
    first = _publish(reg, "one")
    candidate = _publish(reg, "two", make_current=False)
    assert reg.current().id == first.id and candidate.path.is_dir()


def test_failed_staging_leaves_nothing(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with reg.stage() as staged:
            (staged / "half-written").write_text("x")
            1 / 0
    assert reg.list() == [] and not list(tmp_path.glob(".staging-*")) and reg.current() is None


def test_unknown_and_malformed_ids(tmp_path):
    reg = Registry(tmp_path)
    _publish(reg, "one")
    with pytest.raises(RegistryError, match="no release"):
        reg.set_current("20200101T000000Z-deadbeef")
    with pytest.raises(RegistryError, match="not a release id"):
        reg.get("../../etc")
