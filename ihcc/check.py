"""The `--mode=check` data report: what a run would use, what it would skip, and why."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import statistics
import time

from absl import logging

from ihcc import decode
from ihcc.inputs import InputError, Skipped, discover, display_path, find_duplicate_images

EXIT_OK = 0
EXIT_NO_USABLE_IMAGE = 1
EXIT_INPUT_ERROR = 2

_DECODE_WORKERS = 2
_PROGRESS_LOG_SECONDS = 10.0


@dataclasses.dataclass
class DataReport:
    root: str
    manifest: str
    image_size: int
    images_per_participant: dict[str, int] = dataclasses.field(default_factory=dict)  # usable images only
    widths: list[int] = dataclasses.field(default_factory=list)  # after EXIF orientation, full resolution
    heights: list[int] = dataclasses.field(default_factory=list)
    formats: dict[str, int] = dataclasses.field(default_factory=dict)  # Pillow format name -> images
    orientation_fixes: int = 0  # images whose EXIF orientation was not 1
    environments: int = 0  # distinct labelled (participant, environment) pairs
    environment_types: int = 0  # distinct labelled environment types
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    duplicate_groups: list[list[str]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    input_error: str | None = None  # message of the InputError that stopped the check

    @property
    def usable_images(self) -> int:
        return sum(self.images_per_participant.values())

    @property
    def participants(self) -> list[str]:
        return sorted(self.images_per_participant)

    @property
    def exit_code(self) -> int:
        """EXIT_INPUT_ERROR for malformed input, EXIT_NO_USABLE_IMAGE when nothing decodes, else EXIT_OK."""
        if self.input_error is not None:
            return EXIT_INPUT_ERROR
        if self.usable_images == 0:
            return EXIT_NO_USABLE_IMAGE
        return EXIT_OK

    def format(self) -> str:
        """Render the report as plain text for a terminal or a log file."""
        source = f"manifest {display_path(self.manifest)}" if self.manifest else f"folder {display_path(self.root)}"
        if self.manifest and self.root:
            source += f" (paths relative to {display_path(self.root)})"
        lines = [f"Input check of {source} at {self.image_size}x{self.image_size} pixels", ""]
        if self.input_error is not None:
            lines += ["Input error, nothing was checked:", f"  {self.input_error}", "", "Result: FAILED (malformed input)."]
            return "\n".join(lines)

        relative = self._relative_path
        counts = sorted(self.images_per_participant.values())
        lines.append(f"Participants:    {len(self.participants)}")
        lines.append(f"Usable images:   {self.usable_images}")
        lines.append(f"Skipped files:   {len(self.skipped)}")
        if counts:
            lines.append(f"Images per participant: {_min_median_max(counts)}")
        if self.environments or self.environment_types:
            lines.append(f"Labelled environments: {self.environments}, environment types: {self.environment_types}")
        if self.widths:
            lines.append(f"Image width (pixels):  {_min_median_max(self.widths)}")
            lines.append(f"Image height (pixels): {_min_median_max(self.heights)}")
        if self.formats:
            lines.append("Formats: " + ", ".join(f"{name} {count}" for name, count in sorted(self.formats.items())))
        lines.append(f"EXIF orientation applied: {self.orientation_fixes} images")

        lines += ["", "Images per participant:"]
        width = max((len(display_path(name)) for name in self.participants), default=0)
        lines += [f"  {display_path(name):<{width}}  {self.images_per_participant[name]}" for name in self.participants]

        if self.duplicate_groups:
            lines += ["", f"Identical files (same bytes, all kept): {len(self.duplicate_groups)} groups"]
            lines += ["  " + ", ".join(relative(path) for path in group) for group in self.duplicate_groups]
        if self.skipped:
            lines += ["", f"Skipped files ({len(self.skipped)}):"]
            lines += [f"  {relative(entry.path)}: {entry.reason}" for entry in self.skipped]
        if self.warnings:
            lines += ["", f"Warnings ({len(self.warnings)}):"]
            lines += [f"  {warning}" for warning in self.warnings]

        lines.append("")
        if self.exit_code == EXIT_OK:
            lines.append(f"Result: OK, {self.usable_images} images from {len(self.participants)} participants are usable.")
        else:
            lines.append("Result: FAILED, no usable image remains. Fix the skipped files listed above.")
        return "\n".join(lines)


    def _relative_path(self, path: str) -> str:
        """Return `path` relative to the image folder (or the manifest's folder) when it lies inside it."""
        base = os.path.abspath(self.root or os.path.dirname(os.path.abspath(self.manifest)))
        if os.path.commonpath([base, path]) == base:
            return display_path(os.path.relpath(path, base))
        return display_path(path)


def _min_median_max(values: list[int]) -> str:
    ordered = sorted(values)
    median = statistics.median(ordered)
    median_text = str(int(median)) if median == int(median) else f"{median:.1f}"
    return f"min {ordered[0]}, median {median_text}, max {ordered[-1]}"


def check_inputs(root: str, manifest: str, image_size: int) -> DataReport:
    """Discover and decode every input image without caching, and report what a run would use.

    An InputError is caught and stored in the report, whose exit_code is then EXIT_INPUT_ERROR.
    """
    report = DataReport(root=root, manifest=manifest, image_size=image_size)
    try:
        inventory = discover(root=root, manifest=manifest)
    except InputError as error:
        report.input_error = str(error)
        return report

    report.warnings = list(inventory.warnings)
    report.skipped = list(inventory.skipped)
    images_per_participant: collections.Counter[str] = collections.Counter()
    formats: collections.Counter[str] = collections.Counter()
    environments = set()
    environment_types = set()

    paths = [record.path for record in inventory.records]
    with concurrent.futures.ThreadPoolExecutor(max_workers=_DECODE_WORKERS) as executor:
        results = executor.map(_read_or_error, paths, [image_size] * len(paths))
        started = last_log = time.monotonic()
        for done, (record, result) in enumerate(zip(inventory.records, results), start=1):
            now = time.monotonic()
            if now - last_log >= _PROGRESS_LOG_SECONDS:
                logging.info("Checked %d/%d images (%.1f images/s).", done, len(paths), done / (now - started))
                last_log = now
            if isinstance(result, decode.ImageReadError):
                logging.warning("Skipping %s: %s", display_path(record.path), result)
                report.skipped.append(Skipped(record.path, str(result)))
                continue
            images_per_participant[record.participant] += 1
            formats[result.format] += 1
            report.widths.append(result.width)
            report.heights.append(result.height)
            report.orientation_fixes += result.orientation != 1
            if record.environment is not None:
                environments.add((record.participant, record.environment))
            if record.environment_type is not None:
                environment_types.add(record.environment_type)

    report.images_per_participant = dict(images_per_participant)
    report.formats = dict(formats)
    report.environments = len(environments)
    report.environment_types = len(environment_types)
    report.skipped.sort(key=lambda entry: entry.path)
    report.duplicate_groups = find_duplicate_images(inventory.records)

    lost = sorted({record.participant for record in inventory.records} - set(images_per_participant))
    report.warnings += [f"Participant {display_path(name)!r} has no image that decodes; they are left out." for name in lost]
    return report


def _read_or_error(path: str, image_size: int) -> decode.DecodedImage | decode.ImageReadError:
    try:
        return decode.read_image(path, image_size)
    except decode.ImageReadError as error:
        return error
