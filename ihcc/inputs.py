"""Discovery of participant photos from a folder tree or a CSV manifest.

Folder mode reads ROOT/<participant>/<image> or ROOT/<participant>/<environment>/.../<image>.
Manifest mode reads a CSV file with the columns path, participant[, environment,
environment_type]. Both return an Inventory: the candidate image files sorted by path and the
files rejected on the way, each with a reason. Malformed input raises InputError.

Paths are str. File names that are not valid UTF-8 are kept as str with surrogate escapes
(os.fsdecode), so they open again unchanged. display_path() makes them printable.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import os
import stat

from absl import logging

# Extensions of the formats that decode.py reads, compared in lower case.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".heic", ".heif", ".webp"})

# Files and folders that operating systems, file managers and archivers create next to photos.
# They are ignored without a Skipped entry, like every name that starts with a dot
# (which covers .DS_Store and the AppleDouble "._" files of macOS).
SYSTEM_FILE_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini"})
SYSTEM_FOLDER_NAMES = frozenset({"__macosx", "@eadir", "$recycle.bin", "system volume information"})

REQUIRED_COLUMNS = ("path", "participant")
OPTIONAL_COLUMNS = ("environment", "environment_type")

_HASH_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Record:
    path: str  # absolute path of the image file
    participant: str
    environment: str | None = None  # known personal environment (evaluation only)
    environment_type: str | None = None  # known shared type (evaluation only)


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str
    reason: str  # a sentence: what is wrong and what to do


@dataclasses.dataclass
class Inventory:
    records: list[Record]  # candidate image files, sorted by path
    skipped: list[Skipped]  # files rejected during discovery
    # Problems that do not stop a run, such as a participant with a single image.
    warnings: list[str] = dataclasses.field(default_factory=list)


class InputError(ValueError):
    """Malformed input that must stop the run; the message names the file or row and the fix."""


def display_path(path: str) -> str:
    """Return `path` printable as UTF-8, with undecodable bytes shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def is_ignored_name(name: str) -> bool:
    """Return whether a file or folder name belongs to the system, not to the study."""
    lowered = name.lower()
    return name.startswith(".") or lowered in SYSTEM_FILE_NAMES or lowered in SYSTEM_FOLDER_NAMES


def discover(root: str = "", manifest: str = "") -> Inventory:
    """Find the image files of every participant, from a folder tree or a CSV manifest.

    Raises InputError when the root or manifest is missing or malformed, when a participant
    folder contains no image, when two participant ids differ only by case or surrounding spaces,
    or when no image is found at all.
    """
    if manifest:
        records, skipped = _discover_manifest(root, manifest)
        source = f"manifest {display_path(manifest)}"
    elif root:
        records, skipped = _discover_folder(root)
        source = f"folder {display_path(root)}"
    else:
        raise InputError("No input given: pass an image folder (root) or a CSV manifest.")

    if not records:
        raise InputError(
            f"No image file found in {source} ({len(skipped)} files skipped). "
            f"Images must be JPEG, PNG, HEIC/HEIF or WebP files."
            + (f" First skipped: {display_path(skipped[0].path)}: {skipped[0].reason}" if skipped else "")
        )
    _check_participant_ids(sorted({record.participant for record in records}), source)

    records.sort(key=lambda record: record.path)
    skipped.sort(key=lambda entry: entry.path)
    warnings = _participant_warnings(records)
    for warning in warnings:
        logging.warning("%s", warning)
    return Inventory(records=records, skipped=skipped, warnings=warnings)


# ----------------------------------------------------------------------------- file checks


def _open_binary(path: str):
    """Open a file for reading bytes; tests replace this to simulate unreadable files."""
    return open(path, "rb")


def _reject_reason(path: str) -> str | None:
    """Return why `path` cannot be used as an image file, or None when it can be read."""
    printable_path = display_path(path)
    try:
        link_status = os.lstat(path)
    except FileNotFoundError:
        return f"File not found: {printable_path}. Fix the path or remove the entry."
    except OSError as error:
        return f"Cannot read file status of {printable_path} ({error.strerror}). Check the path and its permissions."

    if stat.S_ISLNK(link_status.st_mode):
        try:
            os.stat(path)
        except FileNotFoundError:
            return f"Broken symbolic link {printable_path} -> {display_path(os.readlink(path))}. Fix or remove the link."
        except OSError as error:
            return f"Symbolic link {printable_path} cannot be followed ({error.strerror}, possibly a link loop). Fix or remove the link."

    if not os.path.isfile(path):
        return f"Not a regular file: {printable_path}. Remove it or point the entry at an image file."

    extension = os.path.splitext(path)[1].lower()
    if extension not in IMAGE_EXTENSIONS:
        return (
            f"Not an image file (extension {extension or 'missing'!r}): {printable_path}. "
            f"Only JPEG, PNG, HEIC/HEIF and WebP files are used; convert or move it."
        )

    try:
        with _open_binary(path):
            pass
    except PermissionError:
        return f"Permission denied when reading {printable_path}. Make the file readable (chmod a+r) or remove it."
    except OSError as error:
        return f"Cannot open {printable_path} ({error.strerror}). Check the file and the disk."
    return None


# ----------------------------------------------------------------------------- folder mode


def _discover_folder(root: str) -> tuple[list[Record], list[Skipped]]:
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise InputError(f"Image folder not found: {display_path(root)}. Pass the folder that contains one subfolder per participant.")

    records: list[Record] = []
    skipped: list[Skipped] = []
    empty_participants: list[str] = []
    for name in sorted(os.listdir(root)):
        if is_ignored_name(name):
            continue
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            reason = _reject_reason(path)
            if reason is None:
                reason = (
                    f"Image {display_path(path)} lies directly in the root folder, so it has no participant. "
                    f"Move it into ROOT/<participant>/."
                )
            skipped.append(Skipped(path, reason))
            continue

        participant_records = []
        visited = {_directory_id(path)}
        for file_path, environment in _walk_participant(path, visited, skipped):
            reason = _reject_reason(file_path)
            if reason is not None:
                skipped.append(Skipped(file_path, reason))
                continue
            participant_records.append(Record(path=file_path, participant=name, environment=environment))
        if not participant_records:
            empty_participants.append(name)
        records.extend(participant_records)

    if empty_participants:
        printable_path = ", ".join(display_path(os.path.join(root, name)) for name in empty_participants)
        raise InputError(
            f"Participant folder(s) without any readable image: {printable_path}. "
            f"Add JPEG, PNG, HEIC or WebP images, or remove the folder(s)."
        )
    return records, skipped


def _directory_id(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _walk_participant(folder: str, visited: set[tuple[int, int]], skipped: list[Skipped], environment: str | None = None):
    """Yield (file path, environment) under a participant folder, in sorted order.

    The first folder level below the participant names the environment. Symbolic links to
    folders are followed once; a link back to a folder already visited is skipped.
    """
    try:
        names = sorted(os.listdir(folder))
    except OSError as error:
        skipped.append(Skipped(folder, f"Cannot list folder {display_path(folder)} ({error.strerror}). Make it readable or remove it."))
        return
    for name in names:
        if is_ignored_name(name):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            folder_id = _directory_id(path)
            if folder_id in visited:
                skipped.append(Skipped(path, f"Folder {display_path(path)} links back to a folder already scanned (a symbolic link loop). Remove the link."))
                continue
            visited.add(folder_id)
            yield from _walk_participant(path, visited, skipped, environment if environment is not None else name)
        else:
            yield path, environment


# ----------------------------------------------------------------------------- manifest mode


def _discover_manifest(root: str, manifest: str) -> tuple[list[Record], list[Skipped]]:
    manifest = os.path.abspath(manifest)
    if not os.path.isfile(manifest):
        raise InputError(f"Manifest not found: {display_path(manifest)}. Pass the path of a CSV file with columns path, participant.")
    if root:
        base = os.path.abspath(root)
        if not os.path.isdir(base):
            raise InputError(f"Image folder not found: {display_path(base)}. It is the folder that relative paths in {display_path(manifest)} resolve against.")
    else:
        base = os.path.dirname(manifest)

    rows = _read_manifest_rows(manifest)
    records: list[Record] = []
    skipped: list[Skipped] = []
    first_row_of_path: dict[str, int] = {}
    duplicate_rows: list[str] = []
    for row_number, row in rows:
        path = os.path.normpath(os.path.join(base, os.path.expanduser(row["path"])))
        if path in first_row_of_path:
            duplicate_rows.append(f"rows {first_row_of_path[path]} and {row_number} ({display_path(path)})")
            continue
        first_row_of_path[path] = row_number

        if is_ignored_name(os.path.basename(path)):
            skipped.append(Skipped(path, f"Row {row_number}: {display_path(path)} is a hidden or system file, not a photo. Remove the row."))
            continue
        reason = _reject_reason(path)
        if reason is not None:
            skipped.append(Skipped(path, f"Row {row_number}: {reason}"))
            continue
        records.append(
            Record(
                path=path,
                participant=row["participant"],
                environment=row.get("environment") or None,
                environment_type=row.get("environment_type") or None,
            )
        )

    if duplicate_rows:
        raise InputError(f"Duplicate paths in {display_path(manifest)}: {'; '.join(duplicate_rows)}. Keep one row per image file.")
    return records, skipped


def _read_manifest_rows(manifest: str) -> list[tuple[int, dict[str, str]]]:
    """Read the manifest's data rows as (line number, stripped values by column)."""
    printable_path = display_path(manifest)
    try:
        # utf-8-sig drops the byte order mark that spreadsheet programs write.
        with open(manifest, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if header is None:
                raise InputError(f"Manifest {printable_path} is empty. Add a header row: path,participant[,environment,environment_type].")
            columns = [name.strip().lower() for name in header]
            for required in REQUIRED_COLUMNS:
                if required not in columns:
                    raise InputError(
                        f"Manifest {printable_path} has no column {required!r} (header: {','.join(header)}). "
                        f"Add it: the header must contain path,participant[,environment,environment_type]."
                    )
            rows = []
            for values in reader:
                if not any(value.strip() for value in values):
                    continue
                row_number = reader.line_num
                if len(values) != len(columns):
                    raise InputError(f"Row {row_number} of {printable_path} has {len(values)} values but the header has {len(columns)} columns. Fix the row.")
                row = {column: value.strip() for column, value in zip(columns, values)}
                for required in REQUIRED_COLUMNS:
                    if not row[required]:
                        raise InputError(f"Row {row_number} of {printable_path} has an empty {required!r} value. Fill it in or remove the row.")
                rows.append((row_number, row))
    except UnicodeDecodeError as error:
        raise InputError(f"Manifest {printable_path} is not valid UTF-8 text ({error.reason} at byte {error.start}). Save it as UTF-8 CSV.") from error
    except csv.Error as error:
        raise InputError(f"Manifest {printable_path} is not valid CSV ({error}). Fix the file.") from error
    return rows


# ----------------------------------------------------------------------------- checks


def _check_participant_ids(participants: list[str], source: str) -> None:
    """Raise InputError when participant ids differ only by letter case or surrounding spaces."""
    by_key: dict[str, list[str]] = collections.defaultdict(list)
    for participant in participants:
        by_key[participant.strip().casefold()].append(participant)
    clashes = [names for names in by_key.values() if len(names) > 1]
    if clashes:
        printable_path = "; ".join(" and ".join(repr(display_path(name)) for name in names) for names in clashes)
        raise InputError(
            f"Participant ids in {source} differ only by letter case or spaces: {printable_path}. "
            f"Rename them so that each participant has exactly one id."
        )


def _participant_warnings(records: list[Record]) -> list[str]:
    counts = collections.Counter(record.participant for record in records)
    return [
        f"Participant {display_path(participant)!r} has only one image, so no personal environment can be learned for them."
        for participant, count in sorted(counts.items())
        if count == 1
    ]


def hash_file(path: str) -> str:
    """Return the SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with _open_binary(path) as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def find_duplicate_images(records: list[Record]) -> list[list[str]]:
    """Group the paths of files with identical bytes, within or across participants.

    Only files that share a size are hashed. Returns groups of two or more paths, each sorted,
    in order of their first path. Unreadable files are left out; duplicates are kept in the data.
    """
    paths_by_size: dict[int, list[str]] = collections.defaultdict(list)
    for record in records:
        try:
            paths_by_size[os.path.getsize(record.path)].append(record.path)
        except OSError:
            continue

    groups = []
    for paths in paths_by_size.values():
        if len(paths) < 2:
            continue
        paths_by_hash: dict[str, list[str]] = collections.defaultdict(list)
        for path in paths:
            try:
                paths_by_hash[hash_file(path)].append(path)
            except OSError:
                continue
        groups.extend(sorted(group) for group in paths_by_hash.values() if len(group) > 1)
    return sorted(groups)
