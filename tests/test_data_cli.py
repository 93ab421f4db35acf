"""`t2i-data`: commands work, and bad input is one line with exit status 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from t2i.cli.data import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def one_error_line(result, usage: bool = False) -> str:
    """Our errors are exactly one line; click's own option checks add its usage lines."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and (usage or len(lines) == 1), result.output
    assert "Traceback" not in result.output
    return errors[0]


@pytest.mark.parametrize("args, fragment", [
    (("inspect", "/nonexistent/shards"), "does not exist"),
    (("inspect", "hf://jackyhate/text-to-image-2M"), "HF_HUB_OFFLINE"),
    (("inspect", "hf://jackyhate/text-to-image-2M", "--subset", "256"), "unknown subset"),
    (("pack", "/nonexistent/folder", "/tmp/never"), "not a folder"),
    (("shapes", "/tmp/never", "--count", "0"), "--count"),
])
def test_bad_input_is_one_line_exit_2(args, fragment, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fragment in one_error_line(run(*args), usage=args[0] == "shapes")


def test_empty_folder_is_one_line_exit_2(tmp_path):
    assert "holds no .tar shards" in one_error_line(run("inspect", str(tmp_path)))
    (tmp_path / "src").mkdir()
    assert "no captioned images" in one_error_line(run("pack", str(tmp_path / "src"),
                                                       str(tmp_path / "out")))


def test_shapes_then_inspect_with_sheet(tmp_path):
    out = tmp_path / "shapes"
    result = run("shapes", str(out), "--count", "30", "--shard-size", "10")
    assert result.exit_code == 0 and "into 3 shard(s)" in result.output
    sheet = tmp_path / "sheet.png"
    result = run("inspect", str(out), "--sheet", str(sheet), "--resolution", "64",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert "30 samples; 30 good, 0 bad" in result.output and "truncated at 77" in result.output
    assert sheet.is_file()
    result = run("inspect", str(out), "--json", "--limit", "5", "--no-progress")
    assert result.exit_code == 0 and '"scanned": 5' in result.output


def test_inspect_calls_images_too_small_only_against_a_given_resolution(tmp_path, monkeypatch):
    """Without --resolution a 32 px set is reported as it is, not as 32 too_small samples
    (the old default checked against 256); with one, the report names the resolution used."""
    monkeypatch.setattr("t2i.cli.data.token_counter", lambda: len)  # (the tokenizer: 6 s)
    out = tmp_path / "shapes"
    assert run("shapes", str(out), "--count", "6", "--resolution", "32").exit_code == 0
    result = run("inspect", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "6 samples; 6 good, 0 bad" in result.output and "32x32 6" in result.output
    assert "too_small     not checked (pass --resolution R" in result.output
    info = json.loads(run("inspect", str(out), "--no-progress", "--json").output)
    assert info["resolution"] is None and info["bad_by_kind"] == {}
    info = json.loads(run("inspect", str(out), "--resolution", "256", "--no-progress",
                          "--json").output)
    assert info["resolution"] == 256 and info["bad_by_kind"] == {"too_small": 6}
    result = run("inspect", str(out), "--resolution", "128", "--no-progress")
    assert "6 samples; 6 good, 0 bad" in result.output  # 32 is not under 128 / 4
    assert ("too_small     shorter side under 32 px (a quarter of --resolution 128, as training "
            "at 128 skips them)") in result.output

def test_pack_reports_skips(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 20, 30)).save(src / "a.jpg")
    (src / "a.txt").write_text("a dark picture")
    Image.new("RGB", (40, 30)).save(src / "b.jpg")
    result = run("pack", str(src), str(tmp_path / "out"), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "packed 1 samples" in result.output and "skipped 1 (no caption): b.jpg" in result.output


def test_pack_and_shapes_refuse_a_non_empty_out_unless_overwrite(tmp_path):
    from PIL import Image

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (10 * i, 20, 30)).save(src / f"a{i}.jpg")
        (src / f"a{i}.txt").write_text(f"picture {i}")
    assert run("pack", str(src), str(out), "--shard-size", "1", "--no-progress").exit_code == 0
    line = one_error_line(run("pack", str(src), str(out), "--shard-size", "3", "--no-progress"))
    assert "is not empty" in line and "--overwrite" in line
    assert len(list(out.iterdir())) == 3  # the earlier shards, untouched
    result = run("pack", str(src), str(out), "--shard-size", "3", "--overwrite", "--no-progress")
    assert result.exit_code == 0 and "packed 3 samples into 1 shard(s)" in result.output
    assert [p.name for p in out.iterdir()] == ["data_000000.tar"]
    assert "is not empty" in one_error_line(run("shapes", str(out), "--count", "4"))
    result = run("shapes", str(out), "--count", "4", "--overwrite")
    assert result.exit_code == 0 and "into 1 shard(s)" in result.output
    (out / "keep.txt").write_text("not a shard")
    line = one_error_line(run("shapes", str(out), "--count", "4", "--overwrite"))
    assert "not shards (keep.txt)" in line and (out / "keep.txt").is_file()


def test_pack_with_every_image_unreadable_is_one_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "a.txt").write_text("broken")
    line = one_error_line(run("pack", str(src), str(tmp_path / "out"), "--no-progress"))
    assert "nothing packed" in line and "unreadable image 1" in line
    assert not (tmp_path / "out").exists()
