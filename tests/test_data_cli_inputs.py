"""`t2i-data` on user input it cannot use: an output file or folder it cannot write (checked
before any work), caption files that are not UTF-8 (skipped and reported, never altered),
damaged state files of `t2i-data encode`, and input that holds no image shard (a text file,
latent shards). Each is one `Error:` line with exit status 2 and no traceback, or a skip in the
report."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from t2i.cli import data as data_cli
from t2i.data import encode as enc
from t2i.data.errors import DataError
from t2i.data.inspect import Inspection, write_sheet
from t2i.data.pack import pack_folder
from helpers import error_line, invoke, micro_cfg, save_random_vae, write_image_shards


def run(*args):
    return invoke(data_cli.main, *args)


def one_line(result, *fragments: str) -> str:
    """The one `Error:` line of a command that exited with status 2; it holds `fragments`."""
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    line = error_line(result.output)
    for fragment in fragments:
        assert fragment in line, line
    return line


def no_work(monkeypatch) -> None:
    """Make any inspect scan or tokenizer load fail the test: an option check must come first."""
    def started(*args, **kwargs):
        raise AssertionError("the work started before the option was checked")

    monkeypatch.setattr(data_cli, "token_counter", started)
    monkeypatch.setattr("t2i.data.inspect.inspect_source", started)


# ----------------------------------------------------------------------------------------------
# Output files and folders


@pytest.mark.parametrize("name, shown", [("sheet.jpgx", ".jpgx"), ("sheet", "without an extension"),
                                         ("sheet.xbm", ".xbm")])  # .xbm: PIL writes mode 1 only
def test_a_sheet_format_pil_cannot_write_is_refused_before_any_work(tmp_path, monkeypatch, name,
                                                                     shown):
    shards = write_image_shards(tmp_path / "shards", 1, 2)
    no_work(monkeypatch)
    one_line(run("inspect", shards, "--sheet", tmp_path / name, "--no-progress"),
             "'--sheet'", shown, "use .png or .jpg")
    assert not (tmp_path / name).exists()


def test_a_sheet_extension_in_any_case_writes_that_format(tmp_path, monkeypatch):
    monkeypatch.setattr(data_cli, "token_counter", lambda: len)  # (the tokenizer loads for 6 s)
    shards = write_image_shards(tmp_path / "shards", 1, 3)
    sheet = tmp_path / "new" / "sheet.JPG"
    result = run("inspect", shards, "--sheet", sheet, "--resolution", "16", "--no-progress")
    assert result.exit_code == 0, result.output
    assert Image.open(sheet).format == "JPEG" and "contact sheet" in result.output


def test_a_sheet_under_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    shards = write_image_shards(tmp_path / "shards", 1, 2)
    (tmp_path / "plain").write_text("a file, not a folder")
    no_work(monkeypatch)
    one_line(run("inspect", shards, "--sheet", tmp_path / "plain" / "sheet.png"),
             "'--sheet'", "is a file, not a folder")


def test_write_sheet_names_the_file_it_cannot_write(tmp_path):
    (tmp_path / "plain").write_text("a file, not a folder")
    report = Inspection("x", 1, None)
    with pytest.raises(DataError, match="cannot write contact sheet .*plain/sheet.png"):
        write_sheet(report, tmp_path / "plain" / "sheet.png")
    with pytest.raises(DataError, match=r"\.jpgx"):
        write_sheet(report, tmp_path / "sheet.jpgx")


@pytest.mark.parametrize("command", ["pack", "shapes", "encode"])
def test_an_output_folder_under_a_file_is_refused_before_any_work(tmp_path, command):
    (tmp_path / "plain").write_text("a file, not a folder")
    out = tmp_path / "plain" / "out"
    args = {"pack": ["pack", tmp_path, out],
            "shapes": ["shapes", out, "--count", "3"],
            "encode": ["encode", tmp_path, out, "--vae", tmp_path / "none.safetensors"]}[command]
    one_line(run(*args), "'OUT'", "is a file, not a folder")


def test_convert_vae_writes_only_a_safetensors_file(tmp_path):
    one_line(run("convert-vae", tmp_path / "missing", tmp_path / "vae.bin"),
             "'OUT'", "must end in .safetensors")
    (tmp_path / "plain").write_text("a file, not a folder")
    one_line(run("convert-vae", tmp_path / "missing", tmp_path / "plain" / "vae.safetensors"),
             "'OUT'", "is a file, not a folder")


# ----------------------------------------------------------------------------------------------
# Captions that are not UTF-8


def images(src: Path, count: int) -> None:
    src.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (40, 30), (40 * i, 20, 30)).save(src / f"a{i}.jpg")


def packed_prompts(out: Path) -> list[str]:
    with tarfile.open(out / "data_000000.tar") as tar:
        return [json.loads(tar.extractfile(m).read())["prompt"] for m in tar
                if m.name.endswith(".json")]


def test_a_metadata_line_that_is_not_utf8_is_skipped_and_the_rest_packs(tmp_path):
    src = tmp_path / "src"
    images(src, 4)
    lines = [b'\xef\xbb\xbf{"file_name": "a0.jpg", "text": "first"}',  # a BOM opens the file
             b'{"file_name": "a1.jpg", "text": "caf\xe9"}',  # Latin-1, not UTF-8
             '{"file_name": "a2.jpg", "text": "café"}'.encode(),
             b'{"file_name": "a3.jpg", "text": null}',  # never the caption "None"
             b'{"file_name": "../elsewhere.jpg", "text": "outside"}']
    (src / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = run("pack", src, tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "packed 2 samples into 1 shard(s): 4 images found, 2 skipped" in result.output
    assert ("skipped 2 (unreadable metadata line): metadata.jsonl:2 (a1.jpg), metadata.jsonl:4 "
            "(a3.jpg)") in result.output
    assert "no caption" not in result.output  # a1 and a3 are counted once, by their lines
    assert "unused 1 (caption without image): ../elsewhere.jpg" in result.output
    assert packed_prompts(tmp_path / "out") == ["first", "café"]


def test_a_txt_caption_that_is_not_utf8_is_skipped_not_altered(tmp_path):
    src = tmp_path / "src"
    images(src, 3)
    (src / "a0.txt").write_bytes(b"caf\xe9")
    (src / "a1.txt").write_bytes(b"\xef\xbb\xbfwith a BOM")
    (src / "a2.txt").write_bytes("café".encode())
    report = pack_folder(src, tmp_path / "out")
    assert report.packed == 2 and dict(report.skipped) == {"caption not UTF-8": ["a0.txt"]}
    assert packed_prompts(tmp_path / "out") == ["with a BOM", "café"]


# ----------------------------------------------------------------------------------------------
# Damaged state files of t2i-data encode


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory) -> Path:
    return save_random_vae(micro_cfg(), tmp_path_factory.mktemp("vae") / "vae.safetensors")


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    return write_image_shards(tmp_path_factory.mktemp("images") / "shards", 2, 3, size=16)


def encode(src: Path, out: Path, vae: Path):
    return run("encode", src, out, "--vae", vae, "--resolution", "16", "--device", "cpu",
               "--workers", "0", "--no-progress")


@pytest.fixture(scope="module")
def latents(image_shards, vae_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "latents"
    result = encode(image_shards, out, vae_file)
    assert result.exit_code == 0, result.output
    return out


def test_a_damaged_shard_record_names_the_file(image_shards, vae_file, tmp_path, monkeypatch):
    out, finish = tmp_path / "latents", enc.finish_shard

    def stopped_after_one(shard, plan, chunk, report):
        finish(shard, plan, chunk, report)
        raise KeyboardInterrupt  # Ctrl-C once the first shard is finished

    monkeypatch.setattr(enc, "finish_shard", stopped_after_one)
    assert encode(image_shards, out, vae_file).exit_code == 130
    monkeypatch.setattr(enc, "finish_shard", finish)
    record = out / enc.STATE / "data_000000.tar.json"
    record.write_bytes(b'{"samples": 3, "bad": {}, "bytes": \xff')
    one_line(encode(image_shards, out, vae_file), str(record), "is damaged", "delete it")
    record.unlink()  # as the message says: that shard is encoded anew
    assert encode(image_shards, out, vae_file).exit_code == 0


def test_a_manifest_with_a_bad_shard_entry_names_the_file(latents, image_shards, vae_file,
                                                           tmp_path):
    import shutil

    out = Path(shutil.copytree(latents, tmp_path / "latents"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"]["data_000000.tar"] = {"samples": 3}  # no "bad" counts
    (out / "manifest.json").write_text(json.dumps(manifest))
    one_line(encode(image_shards, out, vae_file), "manifest.json", "bad shard entry")


# ----------------------------------------------------------------------------------------------
# Input that holds no image shard


def test_inspect_and_encode_refuse_a_file_that_is_no_tar(tmp_path, vae_file):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    one_line(run("inspect", prompts, "--no-progress"), "is not a tar shard",
             "t2i-data inspect reads image shards")
    one_line(encode(prompts, tmp_path / "out", vae_file), "is not a tar shard")
    assert not (tmp_path / "out").exists()
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "data_000000.tar").write_text("not a tar at all")
    one_line(run("inspect", renamed, "--no-progress"), "data_000000.tar' is not a tar shard")


def test_inspect_refuses_latent_shards_and_points_at_their_images(latents, image_shards):
    for source in (latents, latents / "data_000001.tar"):
        one_line(run("inspect", source, "--no-progress"), "holds latent shards",
                 "t2i-data inspect reads image shards", str(image_shards), "manifest.json")


def test_shards_with_some_bad_content_are_still_inspected(tmp_path):
    shards = write_image_shards(tmp_path / "shards", 1, 3, size=16)
    (shards / "notes.tar").write_text("not a tar at all")
    with tarfile.open(shards / "empty.tar", "w"):
        pass
    result = run("inspect", shards, "--resolution", "16", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "3 samples; 3 good, 0 bad" in result.output
    assert "shard error   notes.tar after sample 0" in result.output
    assert "empty shards  1: empty.tar" in result.output


def test_inspect_lists_the_first_bad_samples_and_says_why_all_are_split(tmp_path):
    """A tar made as `tar cf x.tar *.jpg *.json` (25 keys: 25 image-only samples, then 25
    caption-only ones): the report names the first 20 bad samples and the tar's fault."""
    (tmp_path / "d").mkdir()
    shard = tmp_path / "d" / "data_000000.tar"
    with tarfile.open(shard, "w") as tar:
        for ext in ("jpg", "json"):
            for i in range(25):
                data = (b"never decoded" if ext == "jpg"
                        else json.dumps({"prompt": f"picture {i}"}).encode())
                info = tarfile.TarInfo(f"k{i:02d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    text = run("inspect", tmp_path / "d", "--no-progress")
    assert text.exit_code == 0, text.output
    assert "50 samples; 0 good, 50 bad" in text.output
    assert ("hint          a sample's files (KEY.jpg, KEY.json) must be next to each other in "
            "the tar") in text.output
    listed = [line for line in text.output.splitlines() if line.startswith("bad sample ")]
    assert listed[0] == f"bad sample    {shard} k00: no_caption (no KEY.json or KEY.txt)"
    assert len(listed) == 21 and listed[-1] == ("bad sample    ... 30 more (only the first 20 "
                                                "are listed)")
    info = json.loads(run("inspect", tmp_path / "d", "--no-progress", "--json").output)
    assert info["bad_by_kind"] == {"no_caption": 25, "no_image": 25}
    assert info["bad_samples"][19] == {"shard": str(shard), "key": "k19", "kind": "no_caption",
                                       "detail": "no KEY.json or KEY.txt"}
    assert len(info["bad_samples"]) == 20 and len(info["hints"]) == 1
    assert "t2i-data pack" in info["hints"][0]


def test_inspect_gives_no_member_order_hint_for_other_bad_samples(tmp_path):
    shards = write_image_shards(tmp_path / "shards", 1, 2, size=16)
    with tarfile.open(shards / "data_000001.tar", "w") as tar:
        info = tarfile.TarInfo("lonely.jpg")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"abcd"))
    info = json.loads(run("inspect", shards, "--resolution", "16", "--no-progress",
                          "--json").output)
    assert info["bad_by_kind"] == {"no_caption": 1} and info["hints"] == []
    assert [(s["key"], s["kind"]) for s in info["bad_samples"]] == [("lonely", "no_caption")]


def test_data_progress_bars_stay_out_of_a_redirected_log(tmp_path):
    """--progress (the default) draws on a terminal only: CliRunner's stderr is none."""
    assert data_cli.bar_shown(True) is None and data_cli.bar_shown(False) is False
    src = write_image_shards(tmp_path / "shards", shards=1, per_shard=3)
    result = invoke(data_cli.main, "inspect", src)
    assert result.exit_code == 0 and "samples" in result.output
    assert "/s]" not in result.output  # tqdm's rate (the old forced bar drew "sample/s]")
