"""read_shard(path, start) enters a local uncompressed tar at sample `start`'s header instead
of reading the samples before it (shards.sample_byte_offset): a resume, or a latent-shard
segment that starts inside a shard, reads headers, not gigabytes. Whatever the way in, the
samples and offsets are those of a whole read."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from t2i.data.shards import ShardIssue, read_shard, sample_byte_offset
from helpers import save_random_vae, micro_cfg, write_image_shards, write_latent_shards


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def odd_tar(path: Path, fmt: int = tarfile.GNU_FORMAT) -> Path:
    """Samples of 1-3 files with hidden and metadata files between them, a folder entry, a
    long (GNU/pax) name, a file without a key and a key that comes back after another."""
    with tarfile.open(path, "w", format=fmt) as tar:
        add(tar, "a.jpg", b"1" * 700)
        add(tar, "a.json", b'{"prompt": "a"}')
        add(tar, ".hidden", b"x")
        add(tar, "__meta__.json", b"{}")
        dir_info = tarfile.TarInfo("sub")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        add(tar, "sub/" + "k" * 120 + ".jpg", b"2" * 2000)
        add(tar, "noext", b"3")
        add(tar, "b.jpg", b"4" * 10)
        add(tar, "b.txt", b"b")
        add(tar, "b.json", b"{}")
        add(tar, "a.jpg", b"5" * 30)  # key a again, after b: a sample of its own
        add(tar, "c.json", b'{"prompt": "c"}')
    return path


def whole(url: str) -> list:
    return [(o, dict(e)) for o, e in (i for i in read_shard(url) if not isinstance(i, ShardIssue))]


def shards_to_check(tmp_path: Path) -> list[Path]:
    images = write_image_shards(tmp_path / "images", shards=1, per_shard=9)
    cfg = micro_cfg(f"data.source={images}")
    latents = write_latent_shards(images, tmp_path / "latents", cfg,
                                  save_random_vae(cfg, tmp_path / "vae.safetensors"))
    return [images / "data_000000.tar", latents / "data_000000.tar",  # ustar, pax
            odd_tar(tmp_path / "gnu.tar"), odd_tar(tmp_path / "pax.tar", tarfile.PAX_FORMAT)]


def test_every_start_gives_the_samples_of_a_whole_read(tmp_path):
    for path in shards_to_check(tmp_path):
        read = whole(str(path))
        assert len(read) >= 5
        for start in range(len(read) + 2):
            assert sample_byte_offset(str(path), start) is not None or start >= len(read)
            got = [(o, dict(e)) for o, e in read_shard(str(path), start)]
            assert got == read[start:], (path.name, start)


def test_a_compressed_tar_is_read_from_its_start(tmp_path):
    plain = odd_tar(tmp_path / "x.tar")
    packed = tmp_path / "x.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert sample_byte_offset(str(packed), 2) is None
    read = whole(str(packed))
    assert len(read) == len(whole(str(plain))) == 5
    assert [(o, dict(e)) for o, e in read_shard(str(packed), 2)] == read[2:]


def test_a_cut_after_the_start_is_reported_with_its_offset(tmp_path):
    path = write_image_shards(tmp_path / "d", shards=1, per_shard=12) / "data_000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    items = list(read_shard(str(path), 3))
    [issue] = [i for i in items if isinstance(i, ShardIssue)]
    samples = [i for i in items if not isinstance(i, ShardIssue)]
    assert samples[0][0] == 3 and issue.kind == "shard_error"
    assert issue.offset == 3 + len(samples)


def rchar() -> int:
    """Bytes this process has read through read() calls (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_skipping_into_a_large_shard_reads_headers_not_samples(tmp_path):
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(40):
            add(tar, f"{i:04d}.bin", os.urandom(1 << 20))  # 40 samples of 1 MiB
            add(tar, f"{i:04d}.json", b"{}")
    before = rchar()
    [(offset, example)] = list(read_shard(str(path), 39))
    read = rchar() - before
    assert offset == 39 and example["__key__"] == "0039" and len(example["bin"]) == 1 << 20
    assert read < 4 << 20  # the last sample and ~80 headers (a streamed skip: 40 MiB)
