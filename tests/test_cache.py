"""The content-addressed work cache: entries are verified, never trusted, and results come back in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.cache import Cache, Entry, cached_map, code_version, open_cache, work_key
from stages.executor import Executor


def _square(x: int) -> int:
    return x * x


def _store(r: int) -> Entry:
    return Entry({"value": r}, {"raw": str(r).encode()})


def _load(e: Entry, item: int) -> int:
    if e.blobs["raw"] != str(e.meta["value"]).encode():
        raise ValueError("blob and meta disagree")
    return int(e.meta["value"])


def _key(x: int) -> str:
    return work_key("test", "code-1", {"setting": 1}, {"x": x})


def test_entries_round_trip_and_a_second_run_reuses_them(tmp_path: Path):
    cache = Cache(tmp_path, "squares")
    with Executor(jobs=2) as ex:
        first = list(cached_map(ex, _square, range(40), cache, _key, _store, _load, window=7, chunksize=2))
    assert first == [(x, x * x) for x in range(40)]
    assert cache.stats["computed"] == 40 and cache.stats["stored"] == 40

    again = Cache(tmp_path, "squares")
    with Executor(jobs=1) as ex:
        second = list(cached_map(ex, _square, range(45), again, _key, _store, _load, window=8))
    assert second == [(x, x * x) for x in range(45)]
    assert again.stats["reused"] == 40 and again.stats["computed"] == 5


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "garbage"])
def test_a_damaged_or_foreign_entry_is_recomputed_not_trusted(tmp_path: Path, damage: str):
    cache = Cache(tmp_path, "squares")
    with Executor(jobs=1) as ex:
        list(cached_map(ex, _square, [3, 4], cache, _key, _store, _load))
    path3, path4 = cache.path(_key(3)), cache.path(_key(4))
    if damage == "truncate":
        path3.write_bytes(path3.read_bytes()[:-3])
    elif damage == "flip":
        data = bytearray(path3.read_bytes())
        data[-1] ^= 0x01
        path3.write_bytes(bytes(data))
    elif damage == "foreign":
        # An intact entry filed under another key: valid bytes, wrong answer.
        path3.write_bytes(path4.read_bytes())
    else:
        path3.write_bytes(b"not an entry")
    again = Cache(tmp_path, "squares")
    with Executor(jobs=1) as ex:
        out = list(cached_map(ex, _square, [3, 4], again, _key, _store, _load))
    assert out == [(3, 9), (4, 16)]
    assert again.stats["corrupt"] == 1 and again.stats["computed"] == 1 and again.stats["reused"] == 1
    # The bad entry was replaced by a good one.
    assert Cache(tmp_path, "squares").get(_key(3)) == _store(9)


def test_an_entry_that_fails_its_loader_is_recomputed(tmp_path: Path):
    cache = Cache(tmp_path, "squares")
    cache.put(_key(5), Entry({"value": 26}, {"raw": b"25"}))  # verifies as bytes, disagrees inside
    with Executor(jobs=1) as ex:
        assert list(cached_map(ex, _square, [5], cache, _key, _store, _load)) == [(5, 25)]
    assert cache.stats["corrupt"] == 1 and cache.stats["computed"] == 1


def test_the_switch_turns_the_cache_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("TIDEPOOL_CACHE", "0")
    cache = open_cache("squares")
    assert not cache.enabled
    cache.put(_key(1), _store(1))
    assert cache.get(_key(1)) is None
    assert not (tmp_path / "c").exists()
    monkeypatch.setenv("TIDEPOOL_CACHE", "1")
    assert open_cache("squares").root == tmp_path / "c"


def test_keys_change_with_settings_inputs_and_code():
    base = work_key("probe", "c1", {"max_pixels": 10}, {"md5": "a"})
    assert base == work_key("probe", "c1", {"max_pixels": 10}, {"md5": "a"})
    assert (
        len(
            {
                base,
                work_key("probe", "c2", {"max_pixels": 10}, {"md5": "a"}),
                work_key("probe", "c1", {"max_pixels": 11}, {"md5": "a"}),
                work_key("probe", "c1", {"max_pixels": 10}, {"md5": "b"}),
                work_key("pack", "c1", {"max_pixels": 10}, {"md5": "a"}),
            }
        )
        == 5
    )


def test_code_version_follows_the_source_of_the_named_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    module = tmp_path / "tp_cache_probe_mod.py"
    module.write_text("X = 1\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_version("tp_cache_probe_mod", libraries=("numpy",))
    assert before == code_version("tp_cache_probe_mod", libraries=("numpy",))
    module.write_text("X = 2\n", encoding="utf-8")
    assert code_version("tp_cache_probe_mod", libraries=("numpy",)) != before
    with pytest.raises(ValueError, match="no source"):
        code_version("tp_no_such_module_here")
