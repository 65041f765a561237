"""Tests for ihcc.cache: contents, incremental updates, crash safety and decode failures."""

import json
import logging
import os
import shutil
import sys
import threading

import numpy as np
import pytest

import imagefiles
from ihcc import cache, decode
from ihcc.cache import build_cache
from ihcc.decode import decode_image
from ihcc.inputs import discover

SIZE = 16


@pytest.fixture
def decode_calls(monkeypatch):
    """Record the path of every decode the cache runs."""
    calls = []
    lock = threading.Lock()
    original = decode.read_image

    def counting_read_image(path, size):
        with lock:
            calls.append(os.path.basename(path))
        return original(path, size)

    monkeypatch.setattr(decode, "read_image", counting_read_image)
    return calls


def write_photo(path, seed):
    """Write a small JPEG whose pixels depend on `seed`, so every photo decodes differently."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return imagefiles.write_image(path, np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8)))


def make_study(root, layout):
    """Write photos for {participant: number of photos} and return their paths."""
    paths = []
    for participant, count in layout.items():
        for number in range(count):
            paths.append(write_photo(root / participant / f"photo{number}.jpg", seed=hash((participant, number)) % 2**32))
    return paths


def assert_matches_direct_decode(cached):
    expected = np.stack([decode_image(record.path, SIZE) for record in cached.records])
    np.testing.assert_array_equal(cached.get_batch(np.arange(len(cached))), expected)


def part_names(cache_dir):
    return sorted(os.listdir(os.path.join(cache_dir, f"images_{SIZE}px", "parts")))


def test_build_matches_direct_decode(tmp_path):
    make_study(tmp_path / "data", {"p01": 3, "p02": 2})
    inventory = discover(root=str(tmp_path / "data"))

    cached = build_cache(inventory, str(tmp_path / "cache"), SIZE)

    assert len(cached) == 5
    assert cached.records == inventory.records
    assert cached.image_size == SIZE
    assert cached.skipped == []
    assert_matches_direct_decode(cached)
    assert "tensorflow" not in sys.modules


def test_get_batch_order_and_repeats(tmp_path):
    make_study(tmp_path / "data", {"p01": 4})
    cached = build_cache(discover(root=str(tmp_path / "data")), str(tmp_path / "cache"), SIZE)
    everything = cached.get_batch(np.arange(4))

    batch = cached.get_batch(np.array([3, 0, 3, 1]))

    np.testing.assert_array_equal(batch, everything[[3, 0, 3, 1]])
    assert cached.get_batch(np.array([], dtype=np.int64)).shape == (0, SIZE, SIZE, 3)


def test_get_batch_rejects_bad_indices(tmp_path):
    make_study(tmp_path / "data", {"p01": 2})
    cached = build_cache(discover(root=str(tmp_path / "data")), str(tmp_path / "cache"), SIZE)

    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        cached.get_batch(np.array([0, 2]))
    with pytest.raises(IndexError):
        cached.get_batch(np.array([-1]))
    with pytest.raises(ValueError, match="1-D integer"):
        cached.get_batch(np.array([0.5]))


def test_second_build_decodes_nothing(tmp_path, decode_calls):
    make_study(tmp_path / "data", {"p01": 3})
    inventory = discover(root=str(tmp_path / "data"))
    build_cache(inventory, str(tmp_path / "cache"), SIZE)
    decode_calls.clear()

    cached = build_cache(inventory, str(tmp_path / "cache"), SIZE)

    assert decode_calls == []
    assert_matches_direct_decode(cached)


def test_added_files_only_decoded(tmp_path, decode_calls):
    make_study(tmp_path / "data", {"p01": 3})
    build_cache(discover(root=str(tmp_path / "data")), str(tmp_path / "cache"), SIZE)
    decode_calls.clear()
    write_photo(tmp_path / "data" / "p01" / "new.jpg", seed=100)
    write_photo(tmp_path / "data" / "p03" / "first.jpg", seed=101)

    cached = build_cache(discover(root=str(tmp_path / "data")), str(tmp_path / "cache"), SIZE)

    assert sorted(decode_calls) == ["first.jpg", "new.jpg"]
    assert len(cached) == 5
    assert len(part_names(str(tmp_path / "cache"))) == 2
    assert_matches_direct_decode(cached)


def test_removed_files_drop_out(tmp_path):
    paths = make_study(tmp_path / "data", {"p01": 2})
    cache_dir = str(tmp_path / "cache")
    build_cache(discover(root=str(tmp_path / "data")), cache_dir, SIZE)
    write_photo(tmp_path / "data" / "p02" / "later.jpg", seed=7)
    write_photo(tmp_path / "data" / "p02" / "later2.jpg", seed=8)
    build_cache(discover(root=str(tmp_path / "data")), cache_dir, SIZE)
    assert len(part_names(cache_dir)) == 2

    for path in paths:
        os.remove(path)
    shutil.rmtree(tmp_path / "data" / "p01")
    cached = build_cache(discover(root=str(tmp_path / "data")), cache_dir, SIZE)

    assert [os.path.basename(record.path) for record in cached.records] == ["later.jpg", "later2.jpg"]
    assert len(part_names(cache_dir)) == 1  # the part that held only removed files is deleted
    index = json.load(open(os.path.join(cache_dir, f"images_{SIZE}px", "index.json")))
    assert len(index["entries"]) == 2
    assert_matches_direct_decode(cached)


def test_changed_file_decoded_again(tmp_path, decode_calls):
    paths = make_study(tmp_path / "data", {"p01": 2})
    cache_dir = str(tmp_path / "cache")
    build_cache(discover(root=str(tmp_path / "data")), cache_dir, SIZE)
    decode_calls.clear()
    write_photo(paths[0], seed=555)
    os.utime(paths[0], ns=(1, 1))  # a changed size or mtime triggers the check even on coarse clocks

    cached = build_cache(discover(root=str(tmp_path / "data")), cache_dir, SIZE)

    assert decode_calls == ["photo0.jpg"]
    assert_matches_direct_decode(cached)


def test_touched_file_not_decoded_again(tmp_path, decode_calls):
    paths = make_study(tmp_path / "data", {"p01": 2})
    cache_dir = str(tmp_path / "cache")
    build_cache(discover(root=str(tmp_path / "data")), cache_dir, SIZE)
    decode_calls.clear()
    os.utime(paths[1], ns=(10**18, 10**18))

    cached = build_cache(discover(root=str(tmp_path / "data")), cache_dir, SIZE)

    assert decode_calls == []
    assert_matches_direct_decode(cached)
    index = json.load(open(os.path.join(cache_dir, f"images_{SIZE}px", "index.json")))
    assert index["entries"][paths[1]]["mtime_ns"] == 10**18


def test_identical_files_decoded_once(tmp_path, decode_calls):
    first = write_photo(tmp_path / "data" / "p01" / "a.jpg", seed=1)
    shutil.copy(first, tmp_path / "data" / "p01" / "b.jpg")
    (tmp_path / "data" / "p02").mkdir()
    shutil.copy(first, tmp_path / "data" / "p02" / "c.jpg")
    write_photo(tmp_path / "data" / "p02" / "d.jpg", seed=2)

    cached = build_cache(discover(root=str(tmp_path / "data")), str(tmp_path / "cache"), SIZE)

    assert sorted(decode_calls) == ["a.jpg", "d.jpg"]
    assert len(cached) == 4
    assert_matches_direct_decode(cached)


def test_decode_failure_skipped_and_logged(tmp_path, decode_calls, caplog):
    make_study(tmp_path / "data", {"p01": 2})
    (tmp_path / "data" / "p01" / "broken.jpg").write_text("not a photo")
    inventory = discover(root=str(tmp_path / "data"))
    caplog.set_level(logging.WARNING)

    cached = build_cache(inventory, str(tmp_path / "cache"), SIZE)

    assert [os.path.basename(record.path) for record in cached.records] == ["photo0.jpg", "photo1.jpg"]
    assert len(cached.skipped) == 1
    assert cached.skipped[0].path == str(tmp_path / "data" / "p01" / "broken.jpg")
    assert "not a readable JPEG" in cached.skipped[0].reason
    assert any("broken.jpg" in message and "not a readable JPEG" in message for message in caplog.messages)

    decode_calls.clear()
    again = build_cache(inventory, str(tmp_path / "cache"), SIZE)

    assert decode_calls == []  # the failure is remembered until the file changes
    assert again.skipped == cached.skipped


def test_discovery_skips_are_carried(tmp_path):
    make_study(tmp_path / "data", {"p01": 2})
    (tmp_path / "data" / "p01" / "notes.txt").write_text("diary")
    inventory = discover(root=str(tmp_path / "data"))

    cached = build_cache(inventory, str(tmp_path / "cache"), SIZE)

    assert cached.skipped == inventory.skipped
    assert len(cached.skipped) == 1


def test_interrupted_build_keeps_previous_cache_and_resumes(tmp_path, monkeypatch, decode_calls):
    data = tmp_path / "data"
    cache_dir = str(tmp_path / "cache")
    make_study(data, {"p01": 2})
    first_inventory = discover(root=str(data))
    build_cache(first_inventory, cache_dir, SIZE)
    for number in range(7):
        write_photo(data / "p02" / f"new{number}.jpg", seed=200 + number)
    monkeypatch.setattr(cache, "PART_MAX_IMAGES", 2)
    monkeypatch.setattr(cache, "DECODE_WORKERS", 1)
    decode_calls.clear()

    counting_read_image = decode.read_image

    def failing_read_image(path, size):
        if len(decode_calls) == 5:
            raise RuntimeError("simulated crash")
        return counting_read_image(path, size)

    monkeypatch.setattr(decode, "read_image", failing_read_image)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(discover(root=str(data)), cache_dir, SIZE)
    monkeypatch.setattr(decode, "read_image", counting_read_image)

    # The interrupted run committed two parts of two images each; the third chunk was lost.
    assert decode_calls == ["new0.jpg", "new1.jpg", "new2.jpg", "new3.jpg", "new4.jpg"]
    previous = build_cache(first_inventory, cache_dir, SIZE)
    assert len(previous) == 2
    assert_matches_direct_decode(previous)

    decode_calls.clear()
    resumed = build_cache(discover(root=str(data)), cache_dir, SIZE)

    assert decode_calls == ["new4.jpg", "new5.jpg", "new6.jpg"]
    assert len(resumed) == 9
    assert_matches_direct_decode(resumed)
    assert not os.path.exists(os.path.join(cache_dir, f"images_{SIZE}px", "tmp"))


def test_leftovers_of_crash_are_removed(tmp_path):
    make_study(tmp_path / "data", {"p01": 2})
    cache_dir = str(tmp_path / "cache")
    inventory = discover(root=str(tmp_path / "data"))
    build_cache(inventory, cache_dir, SIZE)
    store = os.path.join(cache_dir, f"images_{SIZE}px")
    # A crash between renaming a part and saving the index leaves an unlisted part behind.
    shutil.copytree(os.path.join(store, "parts", part_names(cache_dir)[0]), os.path.join(store, "parts", "part-orphan"))
    os.makedirs(os.path.join(store, "tmp", "part-half-written"))

    cached = build_cache(inventory, cache_dir, SIZE)

    assert "part-orphan" not in part_names(cache_dir)
    assert not os.path.exists(os.path.join(store, "tmp"))
    assert_matches_direct_decode(cached)


def test_damaged_part_rebuilt(tmp_path, decode_calls):
    make_study(tmp_path / "data", {"p01": 3})
    cache_dir = str(tmp_path / "cache")
    inventory = discover(root=str(tmp_path / "data"))
    build_cache(inventory, cache_dir, SIZE)
    part_dir = os.path.join(cache_dir, f"images_{SIZE}px", "parts", part_names(cache_dir)[0])
    for name in os.listdir(part_dir):
        if "array_record" in name:
            os.remove(os.path.join(part_dir, name))
    decode_calls.clear()

    cached = build_cache(inventory, cache_dir, SIZE)

    assert len(decode_calls) == 3
    assert_matches_direct_decode(cached)


def test_corrupt_index_rebuilt(tmp_path, decode_calls):
    make_study(tmp_path / "data", {"p01": 2})
    cache_dir = str(tmp_path / "cache")
    inventory = discover(root=str(tmp_path / "data"))
    build_cache(inventory, cache_dir, SIZE)
    with open(os.path.join(cache_dir, f"images_{SIZE}px", "index.json"), "w") as file:
        file.write('{"format_version": 1, "entr')
    decode_calls.clear()

    cached = build_cache(inventory, cache_dir, SIZE)

    assert len(decode_calls) == 2
    assert len(part_names(cache_dir)) == 1
    assert_matches_direct_decode(cached)


def test_image_sizes_cached_separately(tmp_path, decode_calls):
    make_study(tmp_path / "data", {"p01": 2})
    inventory = discover(root=str(tmp_path / "data"))
    build_cache(inventory, str(tmp_path / "cache"), SIZE)

    other = build_cache(inventory, str(tmp_path / "cache"), 8)

    assert len(decode_calls) == 4
    assert other.get_batch(np.array([0])).shape == (1, 8, 8, 3)


def test_undecodable_file_names_cached(tmp_path, decode_calls):
    folder = os.path.join(os.fsencode(tmp_path), b"data", b"p\xff")
    write_photo(os.path.join(folder, b"caf\xe9.jpg"), seed=3)
    write_photo(os.path.join(folder, b"plain.jpg"), seed=4)
    inventory = discover(root=str(tmp_path / "data"))
    build_cache(inventory, str(tmp_path / "cache"), SIZE)
    decode_calls.clear()

    cached = build_cache(inventory, str(tmp_path / "cache"), SIZE)

    assert decode_calls == []
    assert os.fsencode(cached.records[0].path).endswith(b"caf\xe9.jpg")
    assert_matches_direct_decode(cached)
