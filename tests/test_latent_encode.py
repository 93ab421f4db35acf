"""`t2i-data encode`: image shards -> latent shards. Layout and manifest, bad samples counted as
the training loader counts them, moments equal to `vae.encode` of the training loader's pixels,
resume after a kill (byte-identical output), refusals, two gloo ranks; OUT's integrity (no file
an encode did not write is replaced, damaged shards are encoded again) and the bad-sample limit."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i import rng
from t2i.cli.data import main as data_cli
from t2i.config import to_json
from t2i.data import encode as enc
from t2i.data.errors import BadSample, DataError
from t2i.data.latent_shards import moments_from_bytes, read_manifest
from t2i.data.pack import ShardWriter, jpeg_bytes, sample_json
from t2i.data.shards import decode_example, read_shard
from t2i.data.transforms import Transform, load_training_image, to_float
from t2i.models.io import file_sha256, save_weights
from t2i.models.vae import VAE
from t2i.models.vae_files import open_vae
from helpers import encode as image_file, error_line, invoke, micro_f8_cfg

RES = (32, 64)  # both multiples of the f8 VAE's factor


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR)


def write_shards(folder: Path, shards: int = 4, per_shard: int = 5) -> Path:
    """Clean samples of several sizes (a 128 px JPEG is DCT-scaled at 32 px, not at 64)."""
    sizes = (40, 128, 70, 96, 150)
    with ShardWriter(folder, per_shard) as writer:
        for i in range(shards * per_shard):
            w = sizes[i % len(sizes)]
            writer.write(f"k{i:04d}", {"jpg": jpeg_bytes(picture(w, w + i % 3, i), 90),
                                       "json": sample_json(f"picture {i}", index=i)})
    return folder


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# (key, files): good ones, one usable at 32 px only (12 px: too small for 64), and bad kinds.
def messy_samples() -> list[tuple[str, dict[str, bytes]]]:
    good = sample_json("a fine picture", source="test")
    jpeg = image_file(picture(90, 60, 1), "JPEG", quality=90)
    return [("m00", {"jpg": jpeg, "json": good}),
            ("m01", {"jpg": image_file(picture(12, 12, 2), "JPEG"), "json": good}),
            ("m02", {"png": image_file(picture(48, 40, 3).convert("L"), "PNG"), "json": good}),
            ("m03", {"jpg": jpeg, "json": b'{"prompt": "unterminated'}),
            ("m04", {"jpg": jpeg}),
            ("m05", {"jpg": jpeg[: len(jpeg) // 2], "json": good}),
            ("m06", {"jpg": image_file(picture(4, 4, 4), "JPEG"), "json": good}),
            ("m07", {"json": good}),
            ("m08", {"jpg": jpeg, "txt": b"  caption from a txt file "})]


def write_messy_shard(folder: Path) -> None:
    with tarfile.open(folder / "data_000009.tar", "w") as tar:
        for key, files in messy_samples():
            for ext, data in files.items():
                add(tar, f"{key}.{ext}", data)


def run_encode(src: Path, out: Path, vae: Path, *extra) -> tuple[int, str]:
    args = ["encode", src, out, "--vae", vae, "--device", "cpu", "--workers", "0",
            "--no-progress", "--batch-size", "3", *extra]
    result = invoke(data_cli, *args)
    return result.exit_code, result.output


def res_args(resolutions=RES) -> list[str]:
    return [a for r in resolutions for a in ("--resolution", str(r))]


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def training_kind(example: dict, resolution: int) -> str | None:
    """What the training loader makes of a raw example at `resolution`: None or the bad kind."""
    try:
        decode_example(example, Transform(resolution, "center"), 0)
    except BadSample as bad:
        return bad.kind
    return None


def save_vae(path: Path, seed: int, *overrides: str) -> Path:
    """A t2i vae.safetensors of the MICRO_F8 VAE (f8) with seeded random weights and latent
    scale (what t2i-train exports, without the training: the tests need a fixed VAE only)."""
    cfg = micro_f8_cfg(*overrides)
    with rng.seeded(seed, "encode-test"):
        vae = VAE(cfg.vae)
        with torch.no_grad():
            for param in vae.parameters():  # no all-zero layer: every weight shapes the moments
                if not param.any():
                    param.normal_(0.0, 0.05)
    vae.latent_scale.fill_(0.5 + seed)
    save_weights(path, vae.state_dict(), {"config": to_json(cfg)})
    return path


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory) -> Path:
    return save_vae(tmp_path_factory.mktemp("vae") / "vae.safetensors", 0)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = write_shards(tmp_path_factory.mktemp("src") / "shards")
    write_messy_shard(folder)
    return folder


@pytest.fixture(scope="module")
def encoded(source, vae_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "latents"
    status, output = run_encode(source, out, vae_file, *res_args(), "--dtype", "fp32")
    assert status == 0, output
    return out


# ----------------------------------------------------------------------------------------------


def test_layout_manifest_and_bad_counts(source, encoded, vae_file):
    inputs = sorted(p.name for p in source.glob("*.tar"))
    assert sorted(p.name for p in encoded.glob("*.tar")) == inputs
    assert not (encoded / enc.STATE).exists() and not list(encoded.glob(".*.tmp"))
    manifest = read_manifest(encoded)
    vae = open_vae(vae_file)
    assert manifest.vae_sha256 == file_sha256(vae_file)
    assert manifest.latent_scale == float(vae.latent_scale)
    assert (manifest.z_channels, manifest.downsample_factor) == (vae.cfg.z_channels, 8)
    assert (manifest.resolutions, manifest.dtype, manifest.crop, manifest.precision) == (
        RES, "fp32", "center", "fp32")
    assert manifest.source == str(source) and set(manifest.shards) == set(inputs)

    for name in inputs:
        raw = [ex for _, ex in read_shard(str(source / name))]
        record = manifest.shards[name]
        members = tar_members(encoded / name)
        assert record["bytes"] == (encoded / name).stat().st_size
        # every input sample is written or counted, at each resolution as training counts it
        assert record["samples"] + sum(record["bad"].values()) == len(raw)
        for r in RES:
            kinds = Counter(k for k in (training_kind(ex, r) for ex in raw) if k)
            missing = Counter(record.get("missing", {}).get(str(r), {}))
            assert Counter(record["bad"]) + missing == kinds, (name, r)
            with_r = [m for m, _ in members if m.endswith(f".moments{r}.safetensors")]
            assert len(with_r) == record["samples"] - sum(missing.values())
        jsons = [json.loads(data) for m, data in members if m.endswith(".json")]
        assert len(jsons) == record["samples"]
        for meta in jsons:
            assert meta["source_shard"] == name and meta["source_key"]
    assert manifest.bad_by_kind == {"bad_json": 1, "corrupt_image": 1, "no_caption": 1,
                                    "no_image": 1, "too_small": 1}
    messy = manifest.shards["data_000009.tar"]
    assert messy["samples"] == 4 and messy["missing"] == {"64": {"too_small": 1}}
    assert messy["converted"] == {"L": 1}  # the grey PNG, as the training loader counts it
    names = [m for m, _ in tar_members(encoded / "data_000009.tar")]
    assert "m01.moments32.safetensors" in names and "m01.moments64.safetensors" not in names
    metas = {json.loads(d)["source_key"]: json.loads(d)
             for m, d in tar_members(encoded / "data_000009.tar") if m.endswith(".json")}
    assert metas["m08"]["prompt"] == "caption from a txt file"  # a KEY.txt caption
    assert metas["m00"]["source"] == "test"  # the original fields are kept


def expected_moments(source: Path, vae_file: Path, resolution: int, batch: int = 3
                     ) -> dict[str, torch.Tensor]:
    """key -> (2z, h, w) moments of vae.encode over the training loader's pixels, in the
    batches the encoder uses (runs of `batch` usable samples of one shard)."""
    vae = open_vae(vae_file)
    out = {}
    for shard in sorted(source.glob("data_00000[0-3].tar")):  # the clean shards
        raw = [ex for _, ex in read_shard(str(shard))]
        for i in range(0, len(raw), batch):
            part = raw[i:i + batch]
            images = [load_training_image(ex["jpg"], Transform(resolution, "center"))[0]
                      for ex in part]
            with torch.no_grad():
                post = vae.encode(to_float(np.stack(images)))
            moments = torch.cat([post.mean, post.logvar], 1)
            out.update({f"{shard.name}/{ex['__key__']}": m for ex, m in zip(part, moments)})
    return out


def stored_moments(folder: Path, resolution: int) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("data_00000[0-3].tar")):
        for name, data in tar_members(shard):
            if name.endswith(f".moments{resolution}.safetensors"):
                out[f"{shard.name}/{name.split('.')[0]}"] = moments_from_bytes(data)
    return out


def test_moments_equal_vae_encode_of_training_pixels(source, encoded, vae_file, tmp_path):
    for r in RES:
        want = expected_moments(source, vae_file, r)
        got = stored_moments(encoded, r)
        assert got.keys() == want.keys() and len(got) == 20
        assert torch.stack(list(got.values())).std() > 0.01  # moments that tell images apart
        for key in want:  # fp32: the same batches through the same VAE, bit for bit
            assert torch.equal(got[key], want[key]), (r, key)
    # fp16 / bf16 storage: the fp32 moments rounded once to the nearest fp16 / bf16 value, i.e.
    # a relative error of at most 2**-11 (fp16) / 2**-8 (bf16) for normal numbers
    want = stored_moments(encoded, 32)
    for dtype, torch_dtype, rel in (("fp16", torch.float16, 2**-11), ("bf16", torch.bfloat16, 2**-8)):
        out = tmp_path / dtype
        status, output = run_encode(source, out, vae_file, "--resolution", "32", "--dtype", dtype)
        assert status == 0, output
        got = stored_moments(out, 32)
        for key in want:
            assert torch.equal(got[key], want[key].to(torch_dtype).float()), key
            torch.testing.assert_close(got[key], want[key], rtol=rel, atol=1e-6)


def test_decode_groups_give_the_training_pixels():
    """Resolutions that share a decode get exactly the pixels the training loader makes."""
    sources = [image_file(picture(512, 384, 5), "JPEG", quality=90),
               image_file(picture(200, 260, 6), "JPEG"), image_file(picture(100, 90, 7), "PNG")]
    resolutions = (16, 32, 48, 64, 128, 256)
    for data in sources:
        _, images, failed, _ = enc.decode_sample({"jpg": data, "json": sample_json("x")},
                                                 resolutions, "center")
        for r in resolutions:
            if r in failed:
                with pytest.raises(BadSample, match=failed[r].kind):
                    load_training_image(data, Transform(r, "center"))
                continue
            want = load_training_image(data, Transform(r, "center"))[0]
            assert np.array_equal(images[r], want), r


def test_resume_after_a_kill_gives_identical_bytes(source, encoded, vae_file, tmp_path,
                                                   monkeypatch):
    out = tmp_path / "killed"
    finish, calls = enc.finish_shard, []

    def killed_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C between shards
        calls.append(args[2].shard)
        return finish(*args)

    monkeypatch.setattr(enc, "finish_shard", killed_after_two)
    status, output = run_encode(source, out, vae_file, *res_args(), "--dtype", "fp32")
    assert status == 130, output
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(calls)
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    status, output = run_encode(source, out, vae_file, *res_args(), "--dtype", "fp16")
    assert status == 2 and "(--dtype)" in error_line(output)  # the unfinished OUT's settings
    (out / ".data_000003.tar.tmp").write_bytes(b"half a shard from a killed process")
    monkeypatch.setattr(enc, "finish_shard", finish)
    status, output = run_encode(source, out, vae_file, *res_args(), "--dtype", "fp32",
                                "--workers", "2")
    assert status == 0, output
    assert "encoded now" in output
    assert folder_bytes(out) == folder_bytes(encoded)
    # a finished OUT: nothing to do, and the same bytes again
    status, output = run_encode(source, out, vae_file, *res_args(), "--dtype", "fp32")
    assert status == 0 and "(0 encoded now)" in output, output
    assert folder_bytes(out) == folder_bytes(encoded)


def test_refusals(source, encoded, vae_file, tmp_path):
    other = save_vae(tmp_path / "other.safetensors", 1)
    status, output = run_encode(source, encoded, other, *res_args(), "--dtype", "fp32")
    assert status == 2 and "holds latents of another VAE" in error_line(output)
    status, output = run_encode(source, encoded, vae_file, *res_args(), "--dtype", "fp16")
    assert status == 2
    assert "was encoded with dtype='fp32', now 'fp16' (--dtype)" in error_line(output)
    status, output = run_encode(source, encoded, vae_file, "--resolution", "32", "--dtype", "fp32")
    assert status == 2 and "(--resolution)" in error_line(output)
    status, output = run_encode(source, tmp_path / "x", vae_file, "--resolution", "36")
    assert status == 2 and "not a multiple of the VAE's downsampling factor 8" in error_line(output)
    status, output = run_encode(source, source, vae_file)
    assert status == 2 and "holds the input shards" in error_line(output)
    status, output = run_encode(encoded, tmp_path / "y", vae_file, *res_args())
    assert status == 2 and "holds latent shards already" in error_line(output)
    one_shard = sorted(encoded.glob("*.tar"))[0]
    status, output = run_encode(one_shard, tmp_path / "z", vae_file, *res_args())
    assert status == 2 and "holds latent shards already" in error_line(output)
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    status, output = run_encode(source, used, vae_file)
    assert status == 2 and "holds files no encode wrote (e.g. notes.txt)" in error_line(output)
    assert (used / "notes.txt").read_text() == "mine" and len(list(used.iterdir())) == 1


def test_disk_full_is_one_line_and_leaves_no_partial_shard(source, vae_file, tmp_path,
                                                           monkeypatch):
    import errno

    add_file, written = enc.ShardOut.add, []

    def fills_up(self, name, data):
        if len(written) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(name)
        add_file(self, name, data)

    monkeypatch.setattr(enc.ShardOut, "add", fills_up)
    out = tmp_path / "full"
    status, output = run_encode(source, out, vae_file, "--resolution", "32")
    assert status == 2
    assert error_line(output) == f"Error: cannot write into {str(out)!r}: No space left on device"
    assert not list(out.glob("*.tar")) and not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_two_gloo_ranks_encode_disjoint_shards(source, encoded, vae_file, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "t2i.cli.data", "encode", str(source), str(out), "--vae", str(vae_file),
           *res_args(), "--dtype", "fp32", "--device", "cpu", "--workers", "0",
           "--batch-size", "3", "--no-progress"]
    # the ranks use the thread count the `encoded` fixture used (conftest: OMP_NUM_THREADS,
    # default 1): the bytes are compared, and convolutions round differently with more threads
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("samples in 5 shard(s)") == 1  # rank 0 alone reports
    assert "shards encoded now per rank: 3+2" in proc.stdout  # 5 shards: 0,2,4 and 1,3
    manifest = read_manifest(out)
    assert manifest.samples == 24 and sum(manifest.bad_by_kind.values()) == 5
    assert folder_bytes(out) == folder_bytes(encoded)  # the ranks' shards add up to the whole


def test_bench_latents_case_rows(tmp_path):
    """The `latents` bench case: size rows for 256 / 512 / both in fp16, bf16, fp32 from the
    format's own bytes; the encoder and the pipeline, and stage-2 steps from JPEG shards with
    online encoding and from latent shards, each pair timed in one run (no timings checked)."""
    from bench.__main__ import main as bench_main
    from bench.cases.latents import tar_bytes

    out = tmp_path / "r.json"
    result = invoke(bench_main, "latents", "--device", "cpu", "--preset", "tiny", "--quick",
                    "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", out)
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    sizes = [f"size {r}px {d}" for r in ("256", "512", "256+512") for d in ("fp16", "bf16", "fp32")]
    steps = ["stage-2 step 32px, jpeg shards + vae.encode", "stage-2 step 32px, latent shards"]
    assert set(rows) == {*sizes, "vae.encode 32px", "t2i-data encode 32px", *steps}
    z, f = 4, 4  # the tiny preset's VAE
    for name in sizes:
        row = rows[name]
        side = [int(r) for r in name.split()[1][:-2].split("+")]
        width = 2 if name.endswith(("fp16", "bf16")) else 4
        tensor = sum(2 * z * (r // f) ** 2 * width for r in side)
        assert tensor < row["moments_bytes"] < tensor + 200 * len(side)  # + safetensors header
        assert row["moments_bytes"] < row["bytes_per_sample"] <= row["moments_bytes"] + 512 * (
            2 + 2 * len(side))  # tar headers and padding, and KEY.json
        assert row["disk_2_3m_gib"] == pytest.approx(row["bytes_per_sample"] * 2.3e6 / 2**30)
        assert row["fits_64gib_disk"] == (row["disk_2_3m_gib"] < 64)
    assert tar_bytes({"a": b"x" * 513}) == 512 + 1024
    pipe = rows["t2i-data encode 32px"]
    assert pipe["images"] == 4 and pipe["ratio_vs"] == "vae.encode 32px"
    assert rows["vae.encode 32px"]["flops_per_sample"] > 0 and pipe["samples_per_s"] > 0
    assert rows[steps[1]]["ratio_vs"] == steps[0] and rows[steps[1]]["ratio"] > 0
    assert rows[steps[0]]["batch"] == 2 and rows[steps[1]]["samples_per_s"] > 0
    for name in ("t2i-data encode 32px", steps[1]):  # CPU-time ratios against the same baseline
        assert rows[name]["cpu_ratio_vs"] == rows[name]["ratio_vs"] and rows[name]["cpu_s"] > 0


# ----------------------------------------------------------------------------------------------
# OUT's integrity: no file encode did not write is replaced, damaged shards are encoded again,
# and a source too bad for training is refused
# ----------------------------------------------------------------------------------------------


def killed_encode(source: Path, out: Path, vae_file: Path, monkeypatch, shards: int = 2) -> None:
    """An unfinished encode of `source` into `out`: stopped by Ctrl-C after `shards` shards."""
    finish, calls = enc.finish_shard, []

    def killed(*args):
        if len(calls) == shards:
            raise KeyboardInterrupt
        calls.append(args[2].shard)
        return finish(*args)

    monkeypatch.setattr(enc, "finish_shard", killed)
    status, output = run_encode(source, out, vae_file, *res_args(), "--dtype", "fp32")
    monkeypatch.setattr(enc, "finish_shard", finish)
    assert status == 130 and sorted(p.name for p in out.glob("*.tar")) == sorted(calls), output


def refused_untouched(source: Path, out: Path, vae_file: Path, name: str) -> None:
    """encode into `out` is refused with one line naming `name`, and `out` is left as it was."""
    before = folder_bytes(out)
    status, output = run_encode(source, out, vae_file, *res_args(), "--dtype", "fp32")
    assert status == 2, output
    line = error_line(output)
    assert "holds files no encode wrote" in line and name in line, line
    assert folder_bytes(out) == before


def test_encode_never_replaces_a_file_it_did_not_write(source, encoded, vae_file, tmp_path,
                                                       monkeypatch):
    image_shard = write_shards(tmp_path / "photos", 1, 12) / "data_000000.tar"  # t2i-data pack's
    assert image_shard.stat().st_size != (encoded / "data_000000.tar").stat().st_size
    # an OUT holding an image shard, or a copy of SRC
    set_b = tmp_path / "setB"
    set_b.mkdir()
    shutil.copy(image_shard, set_b / "data_000000.tar")
    refused_untouched(source, set_b, vae_file, "data_000000.tar")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    refused_untouched(source, copy, vae_file, "data_000000.tar")
    # ... a stray temporary name in a new OUT (encode writes .NAME.tmp and deletes it)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / ".data_000001.tar.tmp").write_bytes(b"not encode's")
    refused_untouched(source, stray, vae_file, ".data_000001.tar.tmp")
    # an unfinished encode (shards 0 and 1 done) holding an image shard in place of shard 3
    out = tmp_path / "unfinished"
    killed_encode(source, out, vae_file, monkeypatch)
    shutil.copy(image_shard, out / "data_000003.tar")
    refused_untouched(source, out, vae_file, "data_000003.tar")
    (out / "data_000003.tar").unlink()
    # ... and in place of a finished shard (its size no longer matches its record)
    saved = (out / "data_000001.tar").read_bytes()
    shutil.copy(image_shard, out / "data_000001.tar")
    refused_untouched(source, out, vae_file, "data_000001.tar")
    (out / "data_000001.tar").write_bytes(saved)
    # a finished OUT whose shard was replaced by an image shard
    done = tmp_path / "done"
    shutil.copytree(encoded, done)
    shutil.copy(image_shard, done / "data_000000.tar")
    refused_untouched(source, done, vae_file, "data_000000.tar")


def test_an_unrecorded_latent_shard_of_an_unfinished_encode_is_resumed(source, encoded,
                                                                       vae_file, tmp_path,
                                                                       monkeypatch):
    """Killed between renaming a shard into place and writing its record: the shard (a latent
    shard) is encoded again; a file of the user's in OUT/.encode outlives the finish."""
    out = tmp_path / "unfinished"
    killed_encode(source, out, vae_file, monkeypatch)
    [first, _] = sorted(out.glob("*.tar"))
    (out / enc.STATE / f"{first.name}.json").unlink()
    (out / enc.STATE / "notes.txt").write_text("mine")
    status, output = run_encode(source, out, vae_file, *res_args(), "--dtype", "fp32")
    assert status == 0, output
    assert (out / enc.STATE / "notes.txt").read_text() == "mine"
    (out / enc.STATE / "notes.txt").unlink()
    (out / enc.STATE).rmdir()
    assert folder_bytes(out) == folder_bytes(encoded)


@pytest.mark.parametrize("state", ["finished", "unfinished"])
def test_a_damaged_shard_is_encoded_again(source, encoded, vae_file, tmp_path, monkeypatch,
                                          caplog, state):
    out = tmp_path / state
    if state == "finished":
        shutil.copytree(encoded, out)
    else:
        killed_encode(source, out, vae_file, monkeypatch, shards=3)
    [cut, overwritten, *_] = sorted(out.glob("*.tar"))
    half = cut.stat().st_size // 2
    with open(cut, "r+b") as f:
        f.truncate(half)
    with open(overwritten, "r+b") as f:  # same size, but no end-of-archive marker
        f.seek(-600, os.SEEK_END)
        f.write(b"x" * 600)
    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        status, output = run_encode(source, out, vae_file, *res_args(), "--dtype", "fp32")
    assert status == 0, output
    again = [r.getMessage() for r in caplog.records if "encoding" in r.getMessage()]
    assert len(again) == 2, again
    assert f"{cut.name} again: it is {half:,} bytes, its record says" in again[0]
    assert f"{overwritten.name} again: it does not end" in again[1]
    if state == "finished":
        assert "(10 encoded now)" in output  # the two damaged shards of 5 samples each
    assert folder_bytes(out) == folder_bytes(encoded)


def test_an_image_shard_of_the_recorded_size_is_no_finished_shard(source, encoded):
    """Tars pad to 10 KiB, so an image shard copied over a latent shard can have its recorded
    size and end-of-archive blocks: its first sample (no moments) gives it away."""
    from t2i.data.encode_folder import damage

    image_shard = sorted(Path(source).glob("*.tar"))[0]
    latent_shard = encoded / image_shard.name
    record = {"samples": 5, "bytes": image_shard.stat().st_size}
    assert damage(image_shard, record) == "it holds samples without moments (not a latent shard)"
    assert damage(latent_shard, {**record, "bytes": latent_shard.stat().st_size}) is None


def write_bad_source(folder: Path, shards: int, per_shard: int, bad_every: int) -> Path:
    """Shards of tiny (12 px) captioned JPEGs, samples b0000, b0001, ... in order; every
    `bad_every`-th (b0000 first) has no caption (no_caption)."""
    jpeg = image_file(picture(12, 12, 0), "JPEG")
    folder.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(folder / f"data_{s:06d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                add(tar, f"b{i:04d}.jpg", jpeg)
                if i % bad_every:
                    add(tar, f"b{i:04d}.json", sample_json(f"tiny {i}"))
    return folder


def test_a_source_too_bad_for_training_is_refused(vae_file, tmp_path):
    """data.max_bad_fraction (0.05) once data.bad_check_after (200) samples were read, as the
    training loader checks it: 8.3% bad (every 12th sample) is refused, again on a rerun."""
    source = write_bad_source(tmp_path / "src", 2, 120, bad_every=12)
    out = tmp_path / "out"
    for _ in range(2):  # the rerun counts the samples of the shards finished before
        status, output = run_encode(source, out, vae_file, "--resolution", "32", "--dtype", "fp32")
        assert status == 2, output
        line = error_line(output)
        match = re.search(r"(\d+) of (\d+) samples were bad \(\S+% > data.max_bad_fraction "
                          r"0.05; no_caption (\d+)\); a training run at 32 px stops there", line)
        assert match, line
        bad, read = int(match[1]), int(match[2])
        assert 200 <= read < 240 and bad == int(match[3]) == len(range(0, read, 12))
        assert not (out / "manifest.json").exists()
    # --max-bad-fraction loosens it, as --set data.max_bad_fraction does for training
    status, output = run_encode(source, out, vae_file, "--resolution", "32", "--dtype", "fp32",
                                "--max-bad-fraction", "0.1")
    assert status == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"].values()) == 240 - 20
    assert manifest["bad_by_kind"] == {"no_caption": 20}


def test_bad_share_is_checked_per_resolution_over_all_ranks(source, vae_file, tmp_path):
    """Training at 64 px also counts the sample too small for 64 (usable at 32 only); the
    ranks' shards are counted together when rank 0 writes the manifest."""
    vae = open_vae(vae_file)
    for limit, refused in ((0.18, True), (0.21, False)):  # 5 / 29 bad at 32 px, 6 / 29 at 64
        out = tmp_path / str(limit)
        plan = enc.plan_encode(
            str(source), out, subset="512", resolutions=RES, dtype="fp32", crop="center",
            batch_size=3, precision="fp32", vae_sha256="0" * 64, latent_scale=1.0,
            z_channels=vae.cfg.z_channels, factor=8, max_bad_fraction=limit, bad_check_after=25)
        enc.prepare_output(plan)
        for rank in (0, 1):  # 19 and 10 samples: under bad_check_after each
            enc.encode_shards(plan, vae, device=torch.device("cpu"), autocast_dtype=None,
                              rank=rank, world_size=2)
        if refused:
            with pytest.raises(DataError, match=r"6 of 29 samples were bad .* run at 64 px"):
                enc.finish_output(plan)
            assert not (out / "manifest.json").exists()
        else:
            assert enc.finish_output(plan).samples == 24


# ----------------------------------------------------------------------------------------------
# Captions: the latent KEY.json carries the caption online training reads
# ----------------------------------------------------------------------------------------------

CAPTION_CASES = {  # a sample's caption files -> the caption parse_prompt reads
    "json": ({"json": b'{"prompt": "a dog", "url": "u"}'}, "a dog"),
    "img2dataset": ({"json": b'{"caption": "a cat", "url": "u"}', "txt": b"a cat"}, "a cat"),
    "broken json, txt": ({"json": b'{"prompt": "unterminated', "txt": b"from txt"}, "from txt"),
    "non-UTF-8 json, txt": ({"json": b'{"prompt": "caf\xe9"}', "txt": b"from txt"}, "from txt"),
    "list json, txt": ({"json": b"[1, 2]", "txt": b"from txt"}, "from txt"),
    "lone surrogate": ({"json": b'{"prompt": "smiley \\ud83d"}'}, "smiley \ud83d"),
}


def test_every_caption_training_reads_survives_encoding(vae_file, tmp_path):
    """Encode re-read KEY.json on its own: a broken or non-UTF-8 KEY.json beside a good
    KEY.txt, a JSON list, or a lone surrogate crashed the whole encode (and every rerun at the
    same sample); img2dataset's {"caption"} + KEY.txt encoded without a prompt, so training
    counted every such sample no_prompt."""
    from t2i.data.latent_shards import decode_latent_example

    src = tmp_path / "src"
    src.mkdir()
    jpeg = image_file(picture(40, 40, 5), "JPEG")
    with tarfile.open(src / "data_000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (files, _) in enumerate(CAPTION_CASES.values()):
            for ext, data in {"jpg": jpeg, **files}.items():
                add(tar, f"k{i}.{ext}", data)
        add(tar, "caf\udce9.jpg", jpeg)  # a file name that is not UTF-8 (latin-1 bytes)
        add(tar, "caf\udce9.json", b'{"prompt": "latin"}')
    code, output = run_encode(src, tmp_path / "out", vae_file, "--resolution", "32")
    assert code == 0, output
    read = {example["__key__"]: decode_latent_example(example, 32, (8, 4, 4))[1]
            for _, example in read_shard(str(tmp_path / "out" / "data_000000.tar"))}
    assert read == {**{f"k{i}": caption for i, (_, caption) in
                       enumerate(CAPTION_CASES.values())}, "caf\udce9": "latin"}
    meta = json.loads(dict(tar_members(tmp_path / "out" / "data_000000.tar"))["k1.json"])
    assert meta == {"caption": "a cat", "url": "u", "prompt": "a cat",
                    "source_shard": "data_000000.tar", "source_key": "k1"}


def test_a_remote_shard_cut_by_an_outage_is_encoded_again_when_the_source_is_back(
        vae_file, tmp_path, monkeypatch):
    """A remote shard that stays cut past read_shard's retries used to be recorded finished
    (with its shard_error): a rerun never read it again, and the cut-off samples were lost."""
    from t2i.data import shards

    local = write_shards(tmp_path / "src", shards=2, per_shard=12)
    served = {"down": True}

    def fake_open(url: str):
        if "://" not in url:
            return open(url, "rb")  # the output shards
        data = (local / url.rsplit("/", 1)[1]).read_bytes()
        if served["down"] and url.endswith("data_000001.tar"):
            data = data[:len(data) // 2]  # the connection drops half way, at every try
        return io.BytesIO(data)

    monkeypatch.setattr(shards, "open_shard", fake_open)
    monkeypatch.setattr(shards.time, "sleep", lambda s: None)
    source = ",".join(f"https://data.example/data_00000{i}.tar" for i in range(2))
    out = tmp_path / "out"
    code, output = run_encode(source, out, vae_file, "--resolution", "32")
    assert code == 0, output
    assert "1 source shard(s) stopped early (data_000001.tar: their samples after the cut are " \
           "missing; for a remote source run the same command again" in output
    cut = read_manifest(out).shards["data_000001.tar"]["samples"]
    assert 0 < cut < 12
    served["down"] = False
    code, output = run_encode(source, out, vae_file, "--resolution", "32")
    assert code == 0, output
    assert {n: s["samples"] for n, s in read_manifest(out).shards.items()} == {
        "data_000000.tar": 12, "data_000001.tar": 12}
    assert "stopped early" not in output


@pytest.mark.slow
def test_a_rank_that_fails_stops_the_others_within_a_chunk(vae_file, tmp_path):
    """Under torchrun a rank stopped by its data (here: a shard of captions without images)
    used to wait in a collective while the others encoded all their shards, for hours at the
    2M scale, past the 30-minute collective timeout. It now leaves its error in
    OUT/.encode/stop, which the others read after each chunk."""
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "data_000000.tar", "w") as tar:  # rank 0: 1500 good samples
        jpeg = image_file(picture(32, 32, 1), "JPEG")
        for i in range(1500):
            add(tar, f"a{i:05d}.jpg", jpeg)
            add(tar, f"a{i:05d}.json", sample_json(f"picture {i}"))
    with tarfile.open(src / "data_000001.tar", "w") as tar:  # rank 1: 300 without an image
        for i in range(300):
            add(tar, f"b{i:05d}.json", sample_json(f"caption {i}"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "t2i.cli.data", "encode", str(src), str(out), "--vae", str(vae_file),
           "--resolution", "32", "--device", "cpu", "--workers", "0", "--batch-size", "1",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines()
              if line.startswith("Error:")]
    assert len(errors) == 1 and "no_image" in errors[0], proc.stderr[-3000:]
    after = proc.stderr.partition("Traceback")[2]  # torchrun's own report of a failed rank
    assert "/t2i/" not in after, proc.stderr[-3000:]  # and no traceback of ours
    assert not (out / "data_000000.tar").exists()  # rank 0 stopped inside its shard
    assert not (out / "manifest.json").exists()


def test_a_key_that_comes_back_after_a_dropped_sample_stays_a_sample_of_its_own(vae_file,
                                                                               tmp_path):
    """a, b (bad), a: with b dropped the two a's were written side by side and read back as
    one sample (duplicate_file), one fewer than the manifest counted (the split by samples
    trusts that count)."""
    src = tmp_path / "src"
    src.mkdir()
    good = image_file(picture(40, 40, 7), "JPEG")
    with tarfile.open(src / "data_000000.tar", "w") as tar:
        for key, jpg in (("a", good), ("b", b"not an image"), ("a", good), ("c", good)):
            add(tar, f"{key}.jpg", jpg)
            add(tar, f"{key}.json", sample_json(f"picture {key}"))
    code, output = run_encode(src, tmp_path / "out", vae_file, "--resolution", "32")
    assert code == 0, output
    read = [example["__key__"] for _, example in read_shard(str(tmp_path / "out" /
                                                                  "data_000000.tar"))]
    assert read == ["a", "a~1", "c"]
    assert read_manifest(tmp_path / "out").shards["data_000000.tar"]["samples"] == 3
