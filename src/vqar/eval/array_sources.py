"""The array sources of `vqar.eval.sources`: `arr_0` of an `.npz` (rows streamed out of the archive member) and a
`.npy` (memory-mapped). See that module's docstring for what reading a range of rows costs."""

from __future__ import annotations

import contextlib
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from vqar.data.datasets import NPZ_IMAGE_KEYS, spread_indices
from vqar.eval.sources import ImagePart, ImageSource, ReferenceStatsError, Transform, _array_part

# Bytes per read when streaming rows out of an npz member: the transient buffer beside the rows themselves.
NPZ_CHUNK = 1 << 20


class NpzSource(ImageSource):
    """`arr_0` of an `.npz`, read by rows straight from the archive member (see the module docstring)."""

    def __init__(self, path: Path, max_images: int | None):
        super().__init__(path)
        self.path = path
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                key = next((f"{key}.npy" for key in NPZ_IMAGE_KEYS if f"{key}.npy" in names), None)
                if key is None and {"mu.npy", "sigma.npy"} <= set(names):
                    raise ReferenceStatsError(path)
                if key is None:  # said once, by the caller, with the file's name
                    found = sorted(n.removesuffix(".npy") for n in names)
                    raise ValueError(f"it has no image array ({', '.join(NPZ_IMAGE_KEYS)}; keys: {found})")
                self.info = archive.getinfo(key)
                with archive.open(self.info) as member:
                    self.shape, fortran, self.dtype = _npy_header(member)
                    self.header_size = member.tell()
        except ReferenceStatsError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"cannot read images from {path}: {err}") from None
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] not in (1, 3):
            raise ValueError(f"{path}: {self.info.filename.removesuffix('.npy')} must be uint8 (N, H, W, 1 or 3), got "
                             f"{self.dtype} {self.shape}")  # fmt: skip
        self.fortran = fortran
        self.chosen = spread_indices(self.shape[0], max_images)  # the rows this source's entries are

    def __len__(self) -> int:
        return len(self.chosen)

    def read(self, part: slice, transform: Transform | None = None, progress: bool = False) -> ImagePart:
        picked = self.chosen[part]
        try:
            rows = self._fortran_rows(picked) if self.fortran else self._rows(picked)
            if len(picked) == self.shape[0] and not self.fortran:
                self._check_crc(rows)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise ValueError(f"cannot read images from {self.path}: {err}") from None
        return _array_part(rows, transform)

    def _check_crc(self, rows: np.ndarray) -> None:
        """The member's CRC-32 where one read holds all of it (one process reading every row): a stored member's
        rows are read from their offsets, past the zip module's own check, and a damaged file was evaluated without
        a word. (A compressed one is checked by the zip module as it inflates to the end.)"""
        if self.info.compress_type != zipfile.ZIP_STORED:
            return
        with open(self.path, "rb") as stream:
            stream.seek(_member_data_offset(stream, self.info))
            header = stream.read(self.header_size)
        if zlib.crc32(rows.data, zlib.crc32(header)) != self.info.CRC:
            raise ValueError(f"the file is damaged: {self.info.filename} fails its CRC-32 check")

    def _rows(self, picked: np.ndarray) -> np.ndarray:
        """Rows `picked` (increasing), each run of consecutive ones read at once; the bytes between runs are
        sought past in a stored member, and read and dropped in a compressed one."""
        row_bytes = math.prod(self.shape[1:])
        rows = np.empty((len(picked), *self.shape[1:]), dtype=np.uint8)
        if not len(picked):
            return rows
        breaks = np.flatnonzero(np.diff(picked) != 1) + 1
        with contextlib.ExitStack() as stack:
            if self.info.compress_type == zipfile.ZIP_STORED:  # the member's bytes lie in the file as they are
                stream = stack.enter_context(open(self.path, "rb"))
                first_row = _member_data_offset(stream, self.info) + self.header_size

                def move_to(row: int, at: int) -> None:
                    stream.seek(first_row + row * row_bytes)
            else:  # inflated from the start; what lies before a run is read and dropped
                archive = stack.enter_context(zipfile.ZipFile(self.path))
                stream = stack.enter_context(archive.open(self.info))
                _skip(stream, self.header_size)

                def move_to(row: int, at: int) -> None:
                    _skip(stream, (row - at) * row_bytes)

            at = 0  # the row the stream is at
            for begin, end in zip([0, *breaks], [*breaks, len(picked)], strict=True):
                move_to(int(picked[begin]), at)
                _read_into(stream, memoryview(rows[begin:end].reshape(-1)))
                at = int(picked[end - 1]) + 1
        return rows

    def _fortran_rows(self, picked: np.ndarray) -> np.ndarray:
        # Column-major rows are not contiguous in the file: numpy reads the whole array (rare: np.savez writes C
        # order unless handed a Fortran-ordered array).
        with np.load(self.path) as data:
            return np.ascontiguousarray(data[self.info.filename.removesuffix(".npy")][picked])


class NpySource(ImageSource):
    """A `.npy` array of uint8 (N, H, W, 1 or 3), as training reads one, memory-mapped: a range reads its rows."""

    def __init__(self, path: Path, max_images: int | None):
        super().__init__(path)
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except EOFError:  # an empty file
            raise ValueError(f"cannot read images from {path}: the file is empty") from None
        except (OSError, ValueError) as err:  # not an .npy, or an array of Python objects (a pickle)
            why = err
            if "pickled" in str(err):  # numpy's own words advise loading it unsafely
                why = "it is not a NumPy array file (.npy) of numbers (numpy reads it as pickled Python objects)"
            raise ValueError(f"cannot read images from {path}: {why}") from None
        shape, dtype = self.array.shape, self.array.dtype
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
            raise ValueError(f"{path}: evaluation reads uint8 images (N, H, W, 1 or 3), got {dtype} {shape}; save "
                             "them in that layout (an .npz's arr_0, or a folder of image files)")  # fmt: skip
        self.chosen = spread_indices(shape[0], max_images)

    def __len__(self) -> int:
        return len(self.chosen)

    def read(self, part: slice, transform: Transform | None = None, progress: bool = False) -> ImagePart:
        picked = self.chosen[part]
        if len(picked) and picked[-1] - picked[0] == len(picked) - 1:  # consecutive: one slice of the map
            return _array_part(np.array(self.array[picked[0] : picked[-1] + 1]), transform)
        return _array_part(np.asarray(self.array[picked]), transform)


def npz_array_shape(path: str | Path, key: str) -> tuple[int, ...]:
    """The shape of array `key` of an `.npz`, read off its header: the array itself may be gigabytes."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        return _npy_header(member)[0]


def _npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"arr_0 is in .npy format version {version}, which this reader does not know")
    return readers[version](stream)


def _member_data_offset(stream, info: zipfile.ZipInfo) -> int:
    """Where an uncompressed member's bytes start: after its local header, whose name and extra field lengths may
    differ from the central directory's."""
    stream.seek(info.header_offset)
    header = stream.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"bad zip local header for {info.filename}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _skip(stream, size: int) -> None:
    # Not `seek`: ZipExtFile seeks forward by reading pieces of up to 16 MB at once.
    while size > 0:
        got = len(stream.read(min(size, NPZ_CHUNK)))
        if not got:
            raise EOFError("arr_0 ends early")
        size -= got


def _read_into(stream, target: memoryview) -> None:
    done = 0
    while done < len(target):
        got = stream.readinto(target[done : done + NPZ_CHUNK])
        if not got:
            raise EOFError(f"arr_0 ends {len(target) - done} bytes early")
        done += got
