"""Decoded-image cache stored as tensorflow-datasets array_record datasets, built incrementally.

Layout under cache_dir/images_<S>px/:
    index.json        one entry per image path: file size, mtime, SHA-256, and either the
                      part and row holding its pixels or the reason it could not be decoded
    parts/<part>/     one tfds dataset (split "train", array_record, one shard) per build step
    tmp/              parts being written; deleted at the start of every build
    lock              flock()ed while a build runs, so two processes never write at once

A build decodes only files that are new or whose bytes changed, in chunks of PART_MAX_IMAGES.
Each chunk is written into tmp/, fsync()ed, renamed into parts/ and only then added to the
index, which is replaced atomically. A build that is interrupted therefore leaves the previous
index and its parts intact, and the next build keeps every chunk that was committed.
Reading needs no TensorFlow: tfds array_record data sources serve random access.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from ihcc import decode
from ihcc.inputs import Inventory, Record, Skipped, display_path, hash_file

# Bump when decoding changes, so that older caches are rebuilt instead of mixed with new pixels.
INDEX_FORMAT_VERSION = 1
# Images decoded and committed per part; an interrupted build loses at most one chunk of work.
PART_MAX_IMAGES = 1024
# Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
DECODE_WORKERS = 2
PROGRESS_LOG_SECONDS = 10.0

_DATASET_NAME = "ihcc_images"
_SPLIT = "train"
_WRITE_BATCH = 64


class CachedImages:
    """Random access to the decoded images of an inventory, in dataset index order (sorted by path)."""

    def __init__(
        self,
        records: list[Record],
        skipped: list[Skipped],
        image_size: int,
        sources: Sequence[Sequence[dict]],
        locations: np.ndarray,
    ):
        self.records = records  # readable images, in dataset index order
        self.skipped = skipped  # discovery and decode failures
        self.image_size = image_size
        self._sources = sources
        self._locations = locations  # int64 [len(records), 2]: (source number, row in source)

    def __len__(self) -> int:
        return len(self.records)

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        """Return the images at dataset `indices` as uint8 [n, S, S, 3], in the order given."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
            raise ValueError(f"indices must be a 1-D integer array, got shape {indices.shape} and dtype {indices.dtype}.")
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"Image indices must lie in [0, {len(self)}), got values from {indices.min()} to {indices.max()}.")

        size = self.image_size
        batch = np.empty((indices.size, size, size, 3), dtype=np.uint8)
        locations = self._locations[indices]
        for source_number in np.unique(locations[:, 0]):
            positions = np.flatnonzero(locations[:, 0] == source_number)
            rows = locations[positions, 1].tolist()
            examples = self._sources[source_number].__getitems__(rows)
            for position, example in zip(positions, examples):
                batch[position] = example["image"]
        return batch


def build_cache(inventory: Inventory, cache_dir: str, image_size: int) -> CachedImages:
    """Decode every record of `inventory` not yet cached and return random access to all of them.

    Files whose path, size and mtime match the index are not read again. A file with a new
    size or mtime is hashed, and decoded only if no cached image has the same bytes. Records
    that fail to decode become Skipped entries and are logged. Entries of deleted or changed
    files are dropped, and parts that no entry uses are deleted.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}.")
    store = os.path.join(os.path.abspath(cache_dir), f"images_{image_size}px")
    parts_dir = os.path.join(store, "parts")
    tmp_dir = os.path.join(store, "tmp")
    os.makedirs(parts_dir, exist_ok=True)

    with _exclusive_lock(os.path.join(store, "lock")):
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
        index = _load_index(store, image_size)
        sources = _open_parts(store, index)
        _delete_unlisted_parts(parts_dir, index)

        entries, pending, skipped = _plan_updates(inventory.records, index)
        if pending:
            _decode_pending(pending, entries, index, store, image_size, sources)

        # Entries of files outside this inventory stay while the file is unchanged on disk, so
        # that runs on a subset and on the full data share one cache. Deleted files drop out,
        # and parts that no entry uses are deleted after the index no longer lists them.
        entries = {**_unchanged_other_entries(index["entries"], entries), **entries}
        index["entries"] = entries
        used_parts = {entry["part"] for entry in entries.values() if "part" in entry}
        index["parts"] = {part: rows for part, rows in index["parts"].items() if part in used_parts}
        _save_index(store, index)
        _delete_unlisted_parts(parts_dir, index)
        shutil.rmtree(tmp_dir, ignore_errors=True)

    return _assemble(inventory, entries, skipped, image_size, sources)


# ----------------------------------------------------------------------------- planning


def _plan_updates(records: list[Record], index: dict) -> tuple[dict, list[dict], list[Skipped]]:
    """Split records into reusable index entries and files to decode.

    Returns (entries that stay valid, pending decodes, records that vanished or cannot be read).
    Pending decodes are dicts with path, size, mtime_ns, sha256 and `aliases`: later paths with
    the same bytes, which share the decoded image.
    """
    old_entries = index["entries"]
    decoded_by_hash = {entry["sha256"]: entry for entry in old_entries.values() if "part" in entry}
    entries: dict[str, dict] = {}
    pending_by_hash: dict[str, dict] = {}
    skipped: list[Skipped] = []

    for record in records:
        try:
            status = os.stat(record.path)
        except OSError as error:
            skipped.append(Skipped(record.path, f"{display_path(record.path)} disappeared or became unreadable after discovery ({error.strerror}). Run again to rescan."))
            continue
        key = {"size": status.st_size, "mtime_ns": status.st_mtime_ns}

        old = old_entries.get(record.path)
        if old is not None and old["size"] == key["size"] and old["mtime_ns"] == key["mtime_ns"]:
            entries[record.path] = old
            continue

        try:
            key["sha256"] = hash_file(record.path)
        except OSError as error:
            skipped.append(Skipped(record.path, f"Cannot read {display_path(record.path)} ({error.strerror}). Check the file and its permissions."))
            continue

        if old is not None and old["sha256"] == key["sha256"]:
            entries[record.path] = {**old, **key}  # touched but unchanged
        elif key["sha256"] in decoded_by_hash:
            entries[record.path] = {**decoded_by_hash[key["sha256"]], **key}  # same bytes cached under another path
        elif key["sha256"] in pending_by_hash:
            pending_by_hash[key["sha256"]]["aliases"].append({"path": record.path, **key})
        else:
            pending_by_hash[key["sha256"]] = {"path": record.path, **key, "aliases": []}
    return entries, list(pending_by_hash.values()), skipped


def _unchanged_other_entries(old_entries: dict, current: dict) -> dict:
    """Return the old entries for paths outside `current` whose file still has the same size and mtime."""
    kept = {}
    for path, entry in old_entries.items():
        if path in current:
            continue
        try:
            status = os.stat(path)
        except OSError:
            continue
        if status.st_size == entry["size"] and status.st_mtime_ns == entry["mtime_ns"]:
            kept[path] = entry
    return kept


# ----------------------------------------------------------------------------- decoding and writing


def _decode_pending(pending: list[dict], entries: dict, index: dict, store: str, image_size: int, sources: dict) -> None:
    """Decode `pending` chunk by chunk, committing each chunk as a part plus an index update."""
    total = len(pending)
    done = 0
    started = last_log = time.monotonic()
    logging.info("Decoding %d new or changed images into %s.", total, display_path(store))
    with concurrent.futures.ThreadPoolExecutor(max_workers=DECODE_WORKERS) as executor:
        for chunk_start in range(0, total, PART_MAX_IMAGES):
            chunk = pending[chunk_start : chunk_start + PART_MAX_IMAGES]
            results = executor.map(_read_or_error, [item["path"] for item in chunk], [image_size] * len(chunk))
            part, rows = _write_part(zip(chunk, results), store, image_size, entries)
            if part is not None:
                index["parts"][part] = rows
                sources[part] = _open_part(os.path.join(store, "parts", part))
            # The index lists a part only after the part was renamed into place.
            index["entries"] = {**index["entries"], **{path: entries[path] for path in _chunk_paths(chunk)}}
            _save_index(store, index)

            done += len(chunk)
            now = time.monotonic()
            if now - last_log >= PROGRESS_LOG_SECONDS or done == total:
                logging.info("Decoded %d/%d images (%.1f images/s).", done, total, done / max(now - started, 1e-9))
                last_log = now


def _chunk_paths(chunk: list[dict]) -> Iterator[str]:
    for item in chunk:
        yield item["path"]
        for alias in item["aliases"]:
            yield alias["path"]


def _read_or_error(path: str, image_size: int) -> decode.DecodedImage | decode.ImageReadError:
    try:
        return decode.read_image(path, image_size)
    except decode.ImageReadError as error:
        return error


def _write_part(results, store: str, image_size: int, entries: dict) -> tuple[str | None, int]:
    """Write the decoded images of one chunk as a new part and fill in their index entries.

    Returns (part name, number of rows), or (None, 0) when every image in the chunk failed.
    """
    part = f"part-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    tmp_part = os.path.join(store, "tmp", part)
    os.makedirs(tmp_part)
    writer = tfds.core.SequentialWriter(ds_info=_dataset_info(tmp_part, image_size), max_examples_per_shard=2**62, file_format="array_record")
    writer.initialize_splits([_SPLIT])

    rows = 0
    batch = []
    for item, result in results:
        key = {name: item[name] for name in ("size", "mtime_ns", "sha256")}
        if isinstance(result, decode.ImageReadError):
            logging.warning("Skipping %s: %s", display_path(item["path"]), result)
            entry = {**key, "error": str(result)}
        else:
            batch.append(_example(item, result))
            entry = {**key, "part": part, "row": rows, "width": result.width, "height": result.height, "format": result.format, "orientation": result.orientation}
            rows += 1
        entries[item["path"]] = entry
        for alias in item["aliases"]:
            entries[alias["path"]] = {**entry, **{name: alias[name] for name in ("size", "mtime_ns", "sha256")}}
        if len(batch) >= _WRITE_BATCH:
            writer.add_examples({_SPLIT: batch})
            batch = []
    if batch:
        writer.add_examples({_SPLIT: batch})
    writer.close_all()

    if rows == 0:
        shutil.rmtree(tmp_part)
        return None, 0
    _fsync_tree(tmp_part)
    os.rename(tmp_part, os.path.join(store, "parts", part))
    _fsync_directory(os.path.join(store, "parts"))
    return part, rows


def _dataset_info(data_dir: str, image_size: int) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict(
        {
            # Raw bytes: exact, compact and decoded with np.frombuffer.
            "image": tfds.features.Tensor(shape=(image_size, image_size, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
            "path": tfds.features.Text(),  # os.fsencode() bytes of the source path
            "sha256": tfds.features.Text(),
            "format": tfds.features.Text(),
            "width": tfds.features.Scalar(dtype=np.int64),
            "height": tfds.features.Scalar(dtype=np.int64),
            "orientation": tfds.features.Scalar(dtype=np.int64),
        }
    )
    identity = tfds.core.DatasetIdentity(name=_DATASET_NAME, data_dir=data_dir, module_name="", version="1.0.0")
    return tfds.core.DatasetInfo(
        builder=identity,
        description=f"Photos decoded to uint8 RGB {image_size}x{image_size} by ihcc.decode.",
        features=features,
    )


def _example(item: dict, result: decode.DecodedImage) -> dict:
    return {
        "image": result.pixels,
        "path": os.fsencode(item["path"]),
        "sha256": item["sha256"],
        "format": result.format,
        "width": result.width,
        "height": result.height,
        "orientation": result.orientation,
    }


# ----------------------------------------------------------------------------- reading


def _open_part(part_dir: str) -> Sequence[dict]:
    return tfds.builder_from_directory(part_dir).as_data_source(split=_SPLIT)


def _open_parts(store: str, index: dict) -> dict[str, Sequence[dict]]:
    """Open every part in the index; parts that are missing or damaged are dropped with their entries."""
    sources = {}
    for part, rows in list(index["parts"].items()):
        part_dir = os.path.join(store, "parts", part)
        try:
            source = _open_part(part_dir)
            found = len(source)
            # Opening reads only the metadata; reading the first and last rows checks the shard.
            if found:
                source.__getitems__([0, found - 1])
        except Exception as error:  # Any failure to open means the part cannot be trusted.
            found, reason = -1, f"{type(error).__name__}: {error}"
        else:
            reason = f"{found} rows found, {rows} expected"
        if found != rows:
            logging.warning("Cache part %s is damaged (%s); its images will be decoded again.", display_path(part_dir), reason)
            del index["parts"][part]
            continue
        sources[part] = source
    index["entries"] = {path: entry for path, entry in index["entries"].items() if "part" not in entry or entry["part"] in sources}
    return sources


def _assemble(inventory: Inventory, entries: dict, skipped: list[Skipped], image_size: int, sources: dict) -> CachedImages:
    part_names = sorted(sources)
    source_numbers = {part: number for number, part in enumerate(part_names)}
    records = []
    locations = []
    decode_failures = []
    for record in inventory.records:
        entry = entries.get(record.path)
        if entry is None:
            continue
        if "error" in entry:
            decode_failures.append(Skipped(record.path, entry["error"]))
            continue
        records.append(record)
        locations.append((source_numbers[entry["part"]], entry["row"]))
    location_array = np.asarray(locations, dtype=np.int64).reshape(-1, 2)
    all_skipped = list(inventory.skipped) + sorted(skipped + decode_failures, key=lambda entry: entry.path)
    logging.info("Image cache ready: %d images, %d skipped.", len(records), len(all_skipped))
    return CachedImages(records, all_skipped, image_size, [sources[part] for part in part_names], location_array)


# ----------------------------------------------------------------------------- index and files


def _empty_index(image_size: int) -> dict:
    return {"format_version": INDEX_FORMAT_VERSION, "image_size": image_size, "parts": {}, "entries": {}}


def _load_index(store: str, image_size: int) -> dict:
    path = os.path.join(store, "index.json")
    if not os.path.exists(path):
        return _empty_index(image_size)
    try:
        with open(path, encoding="utf-8") as file:
            index = json.load(file)
    except (OSError, ValueError) as error:
        logging.warning("Cache index %s is unreadable (%s); rebuilding the cache.", display_path(path), error)
        return _empty_index(image_size)
    if index.get("format_version") != INDEX_FORMAT_VERSION or index.get("image_size") != image_size:
        logging.warning("Cache index %s was written by another version; rebuilding the cache.", display_path(path))
        return _empty_index(image_size)
    return index


def _save_index(store: str, index: dict) -> None:
    """Replace index.json atomically: write a temporary file, fsync it, then os.replace."""
    path = os.path.join(store, "index.json")
    tmp_path = f"{path}.tmp"
    # json writes lone surrogates from undecodable file names as \udcXX escapes and reads them back.
    with open(tmp_path, "w", encoding="utf-8") as file:
        json.dump(index, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp_path, path)
    _fsync_directory(store)


def _delete_unlisted_parts(parts_dir: str, index: dict) -> None:
    for name in os.listdir(parts_dir):
        if name not in index["parts"]:
            shutil.rmtree(os.path.join(parts_dir, name), ignore_errors=True)


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as file:
            os.fsync(file.fileno())
    _fsync_directory(folder)


def _fsync_directory(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _exclusive_lock(lock_path: str) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info("Waiting for another process that is building the cache at %s.", display_path(os.path.dirname(lock_path)))
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)

