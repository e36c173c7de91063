"""Input tars read member by member: where each sample's files lie, so that the samples of one input tar (a
per-class ImageNet tar, a downloader's tar of pairs) can be planned into many shards and each read with one range
request, never holding the whole tar.

Indexing reads only the tar's headers (a seek past each member's data) and applies the checks that reading a
whole tar does (`processing._tar_members`): links, devices and sparse members are not followed, a name seen again
keeps its first file, a member declared past the end of the tar ends the index as a truncation, and bytes after the
end block are damage. What those checks find becomes `TarSkip` items that travel with the plan, so each is counted
once, in the shard that holds it. A compressed tar cannot be read by ranges: it is read whole (`compressed`).
"""

import io
import tarfile
from dataclasses import dataclass, field

from .storage import open_storage

COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
"""The first bytes of gzip, bzip2 and xz streams, which tarfile opens transparently."""
TAR_ERRORS = (tarfile.TarError, OSError, EOFError)
HEADER_READ_BYTES = 64 << 10
"""How much each read of a header fetches: a header and, for small members, the next few."""
COVERING_READ_SLACK = 64 << 10
"""A sample's files are fetched in one range when the bytes between them are at most this many."""
PAIR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True, slots=True)
class TarSample:
    """One sample of an input tar: its `position` among the tar's samples in key order (which seeds its views),
    its key, and the (role, offset, size) of each file it needs."""

    source: str
    root: str
    name: str
    tar_index: int
    position: int
    key: str
    label: str
    files: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True, slots=True)
class TarSkip:
    """A member or a stretch of an input tar that indexing found unusable, counted when its shard is built."""

    source: str
    root: str
    name: str
    reason: str
    origin: str
    detail: str = ""


@dataclass
class TarIndex:
    """key -> {extension as written: (offset, size)}, in the tar's order, and what was found unusable."""

    origin: str
    compressed: bool = False
    members: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    skips: list[tuple[str, str, str]] = field(default_factory=list)
    """(reason, origin, detail) per finding."""


class _RangeReader(io.RawIOBase):
    """A seekable file over a storage object's range reads."""

    def __init__(self, storage, name: str, size: int):
        self.storage, self.name, self.size, self.position = storage, name, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        data = self.storage.read_range(self.name, self.position, min(self.position + len(buffer), self.size))
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def damage_after_last_member(archive: tarfile.TarFile, end_of_data: int) -> str | None:
    """Python's tarfile ends quietly at a header that is cut short or garbled, dropping every member after it;
    a whole tar has its zero end block there, and nothing but zeros after that (read no further than
    `end_of_data`: a compressed tar could go on expanding)."""
    archive.fileobj.seek(archive.offset)
    end_block = archive.fileobj.read(tarfile.BLOCKSIZE)
    if len(end_block) < tarfile.BLOCKSIZE:
        return "truncated_tar"
    if end_block.count(0) != tarfile.BLOCKSIZE:
        return "corrupt_tar"
    position = archive.offset + tarfile.BLOCKSIZE
    while rest := archive.fileobj.read(1 << 20):
        if rest.count(0) != len(rest):
            return "data_after_end_of_tar"
        position += len(rest)
        if position > end_of_data:
            return "decompressed_too_large"
    return None


def index_tar(root: str, name: str) -> TarIndex:
    """Where each member of an uncompressed input tar lies, grouped by sample key as WebDataset does (the member's
    path up to the first dot of its file name; `a/x.jpg` and `b/x.jpg` are two samples)."""
    storage = open_storage(root)
    origin = storage.url(name)
    index = TarIndex(origin)
    try:
        size = storage.size(name)
        if storage.read_range(name, 0, 6).startswith(COMPRESSED_MAGIC):
            index.compressed = True
            return index
        reader = io.BufferedReader(_RangeReader(storage, name, size), buffer_size=HEADER_READ_BYTES)
        archive = tarfile.open(fileobj=reader, mode="r:")
    except TAR_ERRORS as error:
        index.skips.append(("unreadable_tar", origin, f"{type(error).__name__}: {error}"))
        return index
    seen: set[str] = set()
    damage = None
    with archive:
        try:
            while (member := archive.next()) is not None:
                archive.members = []  # else tarfile keeps every header: tens of thousands in a downloader's tar
                where = f"{origin}:{member.name}"
                if member.isdir():
                    continue
                if not member.isfile():
                    index.skips.append(("not_a_regular_file", where, ""))
                    continue
                if member.issparse():
                    index.skips.append(("sparse_member", where, f"{member.size:,} bytes declared"))
                    continue
                if member.offset_data + member.size > size:
                    damage = "truncated_tar"
                    break
                if member.name in seen:
                    index.skips.append(("duplicate_member", where, ""))
                    continue
                seen.add(member.name)
                folder, slash, file_name = member.name.rpartition("/")
                stem, _, extension = file_name.partition(".")
                index.members.setdefault(folder + slash + stem, {})[extension] = (member.offset_data, member.size)
            else:
                damage = damage_after_last_member(archive, size)
        except TAR_ERRORS:
            damage = "truncated_tar"
        except Exception as error:  # tarfile on bytes no check foresaw: the members before them are kept
            index.skips.append(("unexpected_error", origin, f"{type(error).__name__}: {error}"))
    if damage:
        index.skips.append((damage, origin, ""))
    return index


def image_samples(source: str, root: str, name: str, tar_index: int, label: str, index: TarIndex,
                  image_suffixes: tuple[str, ...]) -> list[TarSample | TarSkip]:
    """One sample per image file of a per-class tar, in (key, extension) order, and the tar's findings."""
    images = sorted((key, extension, place) for key, files in index.members.items()
                    for extension, place in files.items() if f".{extension.lower()}".endswith(image_suffixes))
    return [TarSkip(source, root, name, *skip) for skip in index.skips] + [
        TarSample(source, root, name, tar_index, position, key, label, (("image", *place),))
        for position, (key, _, place) in enumerate(images)]


def pair_samples(source: str, root: str, name: str, tar_index: int, index: TarIndex) -> list[TarSample | TarSkip]:
    """One sample per key of a downloader-layout tar that has an image and a caption, in key order; a key without
    one is a counted skip. Extensions match in any case; of `x.JPG` and `x.jpg` both in one tar, the exact lower-case
    one is used."""
    items: list[TarSample | TarSkip] = [TarSkip(source, root, name, *skip) for skip in index.skips]
    for position, key in enumerate(sorted(index.members)):
        files = {extension.lower(): place for extension, place in sorted(index.members[key].items())}
        image = next((files[e] for e in PAIR_IMAGE_EXTENSIONS if e in files), None)
        origin = f"{source}:{name}:{key}"
        if image is None:
            items.append(TarSkip(source, root, name, "missing_image", origin))
        elif "txt" not in files:
            items.append(TarSkip(source, root, name, "missing_caption", origin))
        else:
            items.append(TarSample(source, root, name, tar_index, position, key, "",
                                   (("image", *image), ("txt", *files["txt"]))))
    return items


def read_sample(sample: TarSample) -> dict[str, bytes] | None:
    """{role: bytes} of one sample, in one range request when its files lie close together; None when the tar
    no longer holds the bytes its index found (it was truncated since)."""
    storage = open_storage(sample.root)
    start = min(offset for _, offset, _ in sample.files)
    stop = max(offset + size for _, offset, size in sample.files)
    if stop - start <= sum(size for _, _, size in sample.files) + COVERING_READ_SLACK:
        span = storage.read_range(sample.name, start, stop)
        files = {role: span[offset - start : offset - start + size] for role, offset, size in sample.files}
    else:
        files = {role: storage.read_range(sample.name, offset, offset + size) for role, offset, size in sample.files}
    if any(len(files[role]) != size for role, _, size in sample.files):
        return None
    return files
