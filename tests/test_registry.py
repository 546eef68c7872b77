"""Release registry: immutable releases, an atomically replaced CURRENT pointer, rollback, integrity
(ids, the GNN / reward-model pairing), permissions, crashed runs' leftovers, ordering."""
import json
import os
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from copl_common.checksums import sha256_file
from copl_common.registry import Registry, RegistryError, _host


def _parts(staged, payload: str) -> None:
    """A GNN and a reward model that records it, as the training pipeline writes them."""
    (staged / "gnn").mkdir()
    (staged / "gnn" / "manifest.json").write_text(json.dumps({"payload": payload}))
    (staged / "reward").mkdir()
    (staged / "reward" / "manifest.json").write_text(json.dumps(
        {"extra": {"gnn_checkpoint": {"manifest_sha256": sha256_file(staged / "gnn" / "manifest.json")}}}))


def _publish(reg: Registry, payload: str, **kw):
    with reg.stage() as staged:
        _parts(staged, payload)
        return reg.publish(staged, {"payload": payload}, **kw)


def test_publish_current_list_and_rollback(tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.current() is None and reg.list() == []
    first = _publish(reg, "one")
    second = _publish(reg, "two")
    assert reg.current().id == second.id
    assert [r.id for r in reg.list()] == [first.id, second.id]
    assert json.loads((second.gnn_dir / "manifest.json").read_text()) == {"payload": "two"}
    assert reg.get(first.id).manifest["payload"] == "one"
    reg.set_current(first.id)  # rollback
    assert reg.current().id == first.id
    assert not list(reg.root.glob(".staging-*")) and not list(reg.root.glob(".CURRENT.*"))


def test_publish_without_switching(tmp_path):
    reg = Registry(tmp_path)
    first = _publish(reg, "one")
    candidate = _publish(reg, "two", make_current=False)
    assert reg.current().id == first.id and candidate.path.is_dir()


def test_publish_copy_is_a_new_release_with_the_same_parts(tmp_path):
    reg = Registry(tmp_path)
    first = _publish(reg, "one")
    copy = reg.publish_copy(first, make_current=False)
    assert copy.id != first.id and reg.current().id == first.id
    assert copy.manifest["copied_from"] == first.id and copy.manifest["payload"] == "one"
    assert copy.created_at > first.created_at
    for part in ("gnn/manifest.json", "reward/manifest.json"):
        assert (copy.path / part).read_bytes() == (first.path / part).read_bytes()
    assert reg.get(copy.id).id == copy.id   # it opens: release.json names its own id
    assert reg.publish_copy(copy).id == reg.current().id


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


@pytest.mark.parametrize("bad_id", ["../x", "../../etc/passwd", "/abs", "20200101T000000Z-deadbeef/..", "", 7])
def test_publish_refuses_an_id_that_is_not_a_release_id(tmp_path, bad_id):
    reg = Registry(tmp_path / "reg")
    with reg.stage() as staged:
        _parts(staged, "x")
        with pytest.raises(RegistryError, match="not a release id"):
            reg.publish(staged, {"id": bad_id})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg"]
    assert list((tmp_path / "reg" / "releases").iterdir()) == []


def test_releases_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        release = _publish(Registry(tmp_path), "one")
    finally:
        os.umask(old)
    for path in [release.path, *release.path.rglob("*"), tmp_path / "CURRENT"]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{path} is {oct(mode)}: group and others must be able to read it"
        if path.is_dir():
            assert mode & 0o011 == 0o011, f"{path} is {oct(mode)}: group and others must be able to enter it"


def test_a_release_whose_gnn_was_swapped_is_refused(tmp_path):
    reg = Registry(tmp_path)
    first = _publish(reg, "one")
    second = _publish(reg, "two")
    # an operator "fixes" the current release by copying another release's GNN into it
    (second.gnn_dir / "manifest.json").write_bytes((first.gnn_dir / "manifest.json").read_bytes())
    with pytest.raises(RegistryError, match="trained with another GNN"):
        reg.current()
    with pytest.raises(RegistryError, match="trained with another GNN"):
        reg.set_current(second.id)
    good, bad = reg.scan()
    assert [r.id for r in good] == [first.id] and [(b.id, "another GNN" in b.reason) for b in bad] == [(second.id, True)]
    with reg.stage() as staged:  # and such a pair is never published
        _parts(staged, "three")
        (staged / "gnn" / "manifest.json").write_text("{}")
        with pytest.raises(RegistryError, match="another GNN"):
            reg.publish(staged, {})


def test_stale_scratch_entries_of_crashed_runs_are_removed(tmp_path):
    reg = Registry(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host_name = _host()
    crashed = tmp_path / f".staging-{host_name}-{dead_pid}-0badc0de"       # this host, process gone
    crashed_pointer = tmp_path / f".CURRENT.{host_name}-{dead_pid}-0badc0de"
    old = tmp_path / ".staging-otherhost-1-00000000"                     # another host: by age only
    legacy = tmp_path / ".CURRENT.3f2a9c"                                # an older naming: by age only
    running = tmp_path / f".staging-{host_name}-{os.getpid()}-12345678"  # alive: this test's own pid
    recent_other = tmp_path / ".staging-otherhost-1-11111111"
    for path in (crashed, old, running, recent_other):
        path.mkdir()
        (path / "weights").write_text("x")
    for path in (crashed_pointer, legacy):
        path.write_text("20200101T000000Z-deadbeef\n")
    day_and_a_bit = time.time() - 25 * 3600
    for path in (old, legacy):
        os.utime(path, (day_and_a_bit, day_and_a_bit))
    release = _publish(reg, "one")  # staging cleans up first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["releases", "CURRENT", running.name, recent_other.name])
    assert reg.current().id == release.id


def test_releases_made_within_one_second_list_in_creation_order(tmp_path):
    reg = Registry(tmp_path)
    made = []
    for suffix in ("ffffffff", "00000000", "cccccccc", "11111111"):  # one second, ids in no particular order
        with reg.stage() as staged:
            _parts(staged, suffix)
            made.append(reg.publish(staged, {"id": f"20260101T000000Z-{suffix}"}).id)
    assert [r.id for r in reg.list()] == made
    created = [datetime.fromisoformat(r.created_at) for r in reg.list()]
    assert created == sorted(created) and all(c.tzinfo == timezone.utc for c in created)


def test_broken_entries_are_reported_beside_the_good_releases(tmp_path):
    reg = Registry(tmp_path)
    good = _publish(reg, "one")
    truncated = _publish(reg, "two", make_current=False)
    (truncated.path / "release.json").write_text('{"id": "' + truncated.id[:5])
    (reg.releases_dir / "20200101T000000Z-00000000").mkdir()          # a copy that never finished
    (reg.releases_dir / "notes").mkdir()                               # something else entirely
    releases, broken = reg.scan()
    assert [r.id for r in releases] == [good.id]
    reasons = {b.id: b.reason for b in broken}
    assert set(reasons) == {truncated.id, "20200101T000000Z-00000000", "notes"}
    assert "release.json is unreadable" in reasons[truncated.id]
    assert "no release.json" in reasons["20200101T000000Z-00000000"]
    assert "not a release id" in reasons["notes"]
