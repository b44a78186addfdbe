"""Reading tar shards by their headers: the same members as `tarfile` for every header flavour, and bad shards
refused by name."""

import io
import tarfile

import pytest

from distrain import errors
from distrain.data.shards import _tar_files, read_image, shard_samples


def _tar(path, members, fmt):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_headers_give_the_members_tarfile_gives(tmp_path, fmt):
    deep = "d" * 60 + "/" + "e" * 60 if fmt == tarfile.USTAR_FORMAT else "x" * 150  # ustar prefix / long names
    members = [("a.jpg", b"1" * 700), ("a.cls", b"3"), (f"{deep}/b.png", b"2" * 513), ("b.cls", b"")]
    url = str(tmp_path / "shard.tar")
    _tar(url, members, fmt)
    with tarfile.open(url) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    assert list(_tar_files(url)) == expected
    refs = shard_samples(url)
    assert [r.sample_id for r in refs] == ["a", "b"] and read_image(refs[1]) == b"2" * 513


def test_bad_shards_are_named(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(errors.DataError, match=r"junk.tar: not a readable tar shard"):
        shard_samples(str(junk))
    url = str(tmp_path / "labels-only.tar")
    _tar(url, [("a.jpg", b"1"), ("b.cls", b"0")], tarfile.PAX_FORMAT)
    with pytest.raises(errors.DataError, match=r"labels-only.tar: sample 'b' has no image"):
        shard_samples(url)
    whole = tmp_path / "whole.tar"
    _tar(str(whole), [("a.jpg", b"1" * 2000)], tarfile.PAX_FORMAT)
    ref = shard_samples(str(whole))[0]
    whole.write_bytes(whole.read_bytes()[: ref.offset + 100])  # cut inside the image
    with pytest.raises(errors.DataError, match=r"whole.tar: sample 'a': truncated shard \(100 of 2000 bytes\)"):
        read_image(ref)
