"""User-input mistakes in t2i-sample and t2i-eval (a user trial): each is one line naming the
file or option, exit status 2, no traceback, and a refused call creates nothing (DESIGN.md
section 5). Prompts files are UTF-8; seeds are t2i-train's range; --out is checked before any
work; img2img that would run no step names --strength and --steps."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

import t2i.cli.eval
import t2i.cli.sample
from t2i.cli.eval import main as eval_cli
from t2i.cli.sample import main as sample_cli, prompt_lines
from helpers import error_line, invoke

MAX_SEED = 2**63 - 1
CLIS = {"sample": (sample_cli, []), "eval": (eval_cli, ["--suite", "agreement"])}
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


pytestmark = pytest.mark.usefixtures("keep_threads")  # conftest.py


@pytest.fixture
def loads(monkeypatch, tmp_path) -> list:
    """Run in an empty folder; record every model load (the start of the work)."""
    calls: list = []
    monkeypatch.chdir(tmp_path)
    for module in (t2i.cli.sample, t2i.cli.eval):
        monkeypatch.setattr(module, "load_pipeline", lambda *a, **k: calls.append(a))
    return calls


def refused(result) -> str:
    """The one `Error:` line of a call refused with exit status 2 (nothing else printed)."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return error_line(result.output)


# ----------------------------------------------------------------------------------------------
# --prompts files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_a_prompts_file_that_is_not_utf8_is_one_line_naming_it(loads, tmp_path, cli):
    command, args = CLIS[cli]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe bad")
    line = refused(invoke(command, tmp_path / "run", *args, "--prompts", "bin.txt"))
    assert line == ("Error: --prompts 'bin.txt' is not UTF-8 text (bad byte at offset 0); "
                    "save it as UTF-8, one prompt per line")
    assert loads == []


def test_prompts_files_are_read_as_utf8_without_the_bom(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffcafé rouge\n\n  ein grüner Kreis  \n".encode("utf-8"))
    assert prompt_lines(str(path)) == ["café rouge", "ein grüner Kreis"]


@pytest.mark.parametrize("cli", sorted(CLIS))
@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_an_empty_prompts_file_is_named(loads, tmp_path, cli, text):
    command, args = CLIS[cli]
    (tmp_path / "p.txt").write_text(text)
    line = refused(invoke(command, tmp_path / "run", *args, "--prompts", "p.txt"))
    assert line == ("Error: --prompts 'p.txt' holds no prompt (one prompt per line; blank "
                    "lines are skipped)")
    assert "argument" not in line and loads == []


def test_an_empty_prompts_file_is_refused_beside_prompt_arguments(loads, tmp_path):
    (tmp_path / "p.txt").write_text("\n")
    line = refused(invoke(sample_cli, tmp_path / "run", "a red circle", "--prompts", "p.txt"))
    assert "--prompts 'p.txt' holds no prompt" in line


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_a_prompts_folder_is_called_a_folder(loads, tmp_path, cli):
    command, args = CLIS[cli]
    (tmp_path / "prompts").mkdir()
    line = refused(invoke(command, tmp_path / "run", *args, "--prompts", "prompts"))
    assert line == "Error: --prompts 'prompts' is a folder, not a file with one prompt per line"


def test_no_prompt_at_all_asks_for_one(loads, tmp_path):
    line = refused(invoke(sample_cli, tmp_path / "run"))
    assert line == "Error: give at least one prompt (arguments or --prompts FILE)"


# ----------------------------------------------------------------------------------------------
# A refused t2i-sample creates nothing; img2img with no step to run
# ----------------------------------------------------------------------------------------------


REFUSED_AFTER_LOADING = {
    "steps": (["--steps", "1001"], "Error: --steps 1001 must be between 1 and 1000 (the run's "
                                   "schedule.num_train_timesteps)"),
    "height": (["--height", "30"], "Error: --height 30 must be a positive multiple of 4 (VAE "
                                   "factor 2 x UNet downsampling)"),
    "strength": (["--init-image", "img.png", "--strength", "0.2", "--steps", "3"],
                 "Error: --strength 0.2 with --steps 3 runs no denoising step (int(steps x "
                 "strength) = 0): raise --steps or --strength (--strength 0 returns the "
                 "encoded-decoded image)"),
}


@pytest.mark.parametrize("out", [None, "o"])
@pytest.mark.parametrize("case", sorted(REFUSED_AFTER_LOADING))
def test_a_refused_sample_creates_no_output_folder(micro_run, tmp_path, monkeypatch, case, out):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (16, 16), (200, 30, 30)).save("img.png")
    args, expected = REFUSED_AFTER_LOADING[case]
    where = ["--out", out] if out else []
    assert refused(invoke(sample_cli, micro_run, "a red circle", *args, *where)) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]  # no samples/ nor o/


def test_strength_zero_returns_the_input_with_any_steps(micro_run, tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "img.png")
    result = invoke(sample_cli, micro_run, "a red circle", "--init-image", tmp_path / "img.png",
                    "--strength", 0, "--steps", 3, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a-red-circle-seed0.png",
                                                                  "grid.png"]


def test_strength_that_runs_one_step_is_accepted(micro_run, tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "img.png")
    result = invoke(sample_cli, micro_run, "a red circle", "--init-image", tmp_path / "img.png",
                    "--strength", 0.2, "--steps", 5, "--out", tmp_path / "o")  # int(5 x 0.2) = 1
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------------
# --out that cannot be written
# ----------------------------------------------------------------------------------------------


@needs_proc
@pytest.mark.parametrize("cli, args", [(sample_cli, ["a red circle"]),
                                       (eval_cli, ["--suite", "shapes"])])
def test_out_that_cannot_be_written_is_refused_before_loading(loads, tmp_path, cli, args):
    line = refused(invoke(cli, tmp_path / "run", *args, "--out", "/proc/nope"))
    # root passes the os.access check and meets the failed mkdir; another user stops at the
    # access check: either way one line naming --out and the folder, before any load
    assert line.startswith("Error: ") and "--out" in line and "/proc" in line
    assert loads == [] and not Path("/proc/nope").exists()


def test_the_out_check_leaves_nothing_behind(loads, tmp_path):
    (tmp_path / "out").mkdir()
    result = invoke(sample_cli, tmp_path / "run", "a", "--out", tmp_path / "out" / "new")
    assert len(loads) == 1, result.output  # got past the checks
    assert list((tmp_path / "out").iterdir()) == []


def test_eval_prints_the_report_before_a_write_failure_naming_out(micro_run, monkeypatch,
                                                                 tmp_path):
    """--out passes the early check, then cannot be written at the end (a disk that fills
    meanwhile): the numbers are on stdout and the one error line names --out."""
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(t2i.cli.eval, "write_files", full_disk)
    out = tmp_path / "out"
    result = invoke(eval_cli, micro_run, "--suite", "vae", "--n", 2, "--out", out)
    assert result.exit_code == 2, result.output
    assert json.loads(result.stdout)["suite"] == "vae"
    assert error_line(result.stderr) == (f"Error: --out {str(out)!r}: cannot write the report "
                                         f"(No space left on device); its numbers are printed "
                                         f"above")


# ----------------------------------------------------------------------------------------------
# --out holding files of an earlier call: nothing is lost without --overwrite (t2i-sample
# writes beside them, t2i-eval refuses)
# ----------------------------------------------------------------------------------------------


def clash_line(out: Path, name: str) -> str:
    return (f"Error: --out {str(out)!r} already holds {name}: choose another --out, or pass "
            f"--overwrite to replace the files this call writes")


def test_sample_keeps_the_files_of_an_earlier_call_and_writes_beside_them(micro_run, tmp_path):
    """A second call into one --out: its grid and a same prompt+seed image get the first free
    -2 / -3 suffix; nothing earlier is touched."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = ["a-red-circle-seed0.png", "grid.png", "grid-2.png", "a-red-circle-seed1.png"]
    for name in earlier:
        (out / name).write_bytes(b"an earlier image")
    result = invoke(sample_cli, micro_run, "a red circle", "a blue square", "--steps", 1,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert all((out / n).read_bytes() == b"an earlier image" for n in earlier)
    written = ["a-red-circle-seed0-2.png", "a-blue-square-seed1.png", "grid-3.png"]
    assert [Image.open(out / n).format for n in written] == ["PNG"] * 3
    assert f"seed 0: {out / written[0]}" in result.output
    assert f"grid: {out / written[2]}" in result.output


def test_sample_with_overwrite_replaces_the_earlier_files(micro_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a-red-circle-seed0.png", "grid.png", "other.png"):
        (out / name).write_bytes(b"an earlier image")
    result = invoke(sample_cli, micro_run, "a red circle", "--steps", 1, "--out", out,
                    "--overwrite")
    assert result.exit_code == 0, result.output
    assert [Image.open(out / n).format for n in ("a-red-circle-seed0.png", "grid.png")] == [
        "PNG", "PNG"]
    assert (out / "other.png").read_bytes() == b"an earlier image"


class StubPipeline:
    """What t2i-eval's header reads of a pipeline (the suite itself is stubbed too)."""
    source, device = "run", "cpu"
    cfg = SimpleNamespace(data=SimpleNamespace(source="shapes"))

    def guidance(self, value):
        return 5.0 if value is None else value


@pytest.fixture
def stub_suites(monkeypatch) -> list:
    """t2i-eval with a stub model and a shapes suite that finds no failure; records each run."""
    runs: list = []
    monkeypatch.setattr(t2i.cli.eval, "load_model", lambda *a: StubPipeline())
    monkeypatch.setattr(t2i.cli.eval, "run_suite",
                        lambda pipe, suite, *a: runs.append(suite) or ({"accuracy": 1.0}, []))
    return runs


@pytest.mark.parametrize("earlier", ["eval-shapes.json", "shapes_failures.png"])
def test_eval_refuses_an_out_holding_its_report_or_grid(stub_suites, tmp_path, earlier):
    out = tmp_path / "out"
    out.mkdir()
    (out / earlier).write_text("an earlier result")
    assert refused(invoke(eval_cli, "run", "--suite", "shapes", "--out", out)) == \
        clash_line(out, earlier)
    assert stub_suites == [] and (out / earlier).read_text() == "an earlier result"
    result = invoke(eval_cli, "run", "--suite", "vae", "--out", out)  # another suite's report
    assert result.exit_code == 0 and stub_suites == ["vae"], result.output


def test_eval_with_overwrite_replaces_the_report_and_drops_an_earlier_failures_grid(
        stub_suites, tmp_path):
    """The new run failed on no image: a grid left beside its report would contradict it."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("eval-shapes.json", "shapes_failures.png", "eval-vae.json"):
        (out / name).write_text("an earlier result")
    result = invoke(eval_cli, "run", "--suite", "shapes", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "eval-shapes.json").read_text())["accuracy"] == 1.0
    assert sorted(p.name for p in out.iterdir()) == ["eval-shapes.json", "eval-vae.json"]

# ----------------------------------------------------------------------------------------------
# Seeds: t2i-train's range 0 .. 2^63 - 1, for every image's seed + i
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cli, args", [(sample_cli, ["a"]), (eval_cli, ["--suite", "shapes"])])
@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_a_seed_out_of_range_is_refused(loads, tmp_path, cli, args, seed):
    line = refused(invoke(cli, tmp_path / "run", *args, "--seed", seed))
    assert line == (f"Error: Invalid value for '--seed': {seed} is not in the range "
                    f"0<=x<={MAX_SEED}.")
    assert loads == []


def test_the_last_images_seed_must_be_in_range_too(loads, tmp_path):
    line = refused(invoke(sample_cli, tmp_path / "run", "a", "b", "--seed", MAX_SEED))
    assert line == (f"Error: --seed {MAX_SEED}: image i uses seed + i, and seed + 1 passes the "
                    f"largest seed {MAX_SEED} (2^63 - 1); use --seed {MAX_SEED - 1} or less")
    invoke(sample_cli, tmp_path / "run", "a", "b", "--seed", MAX_SEED - 1)
    assert len(loads) == 1  # the largest seed that fits got past the checks


def test_eval_counts_every_image_it_draws_against_the_seed_range(loads, tmp_path):
    too_far = invoke(eval_cli, tmp_path / "run", "--suite", "shapes", "--n", 2, "--n-held-out", 1,
                     "--seed", MAX_SEED - 1)  # seeds MAX - 1, MAX, MAX + 1
    assert "seed + 2 passes the largest seed" in refused(too_far)
    invoke(eval_cli, tmp_path / "run", "--suite", "shapes", "--n", 2, "--n-held-out", 1,
           "--seed", MAX_SEED - 2)
    assert len(loads) == 1


# ----------------------------------------------------------------------------------------------
# FID / CLIP weights
# ----------------------------------------------------------------------------------------------

FID_NEEDS = ("FID needs Inception-v3 weights, which cannot be downloaded here: pass "
             "--inception-weights PATH to torchvision's inception_v3 IMAGENET1K_V1 state dict "
             "(.pth)")
CLIP_NEEDS = ("CLIP score needs open_clip ViT-B-32 weights, which cannot be downloaded here: "
              "pass --clip-weights PATH (and --clip-model NAME)")


def test_fid_without_weights_is_one_line_of_separate_sentences(loads, tmp_path):
    line = refused(invoke(eval_cli, tmp_path / "run", "--suite", "fid", "--n", 4))
    assert line == f"Error: nothing to measure: {FID_NEEDS}. {CLIP_NEEDS}"


@pytest.mark.parametrize("option", ["--inception-weights", "--clip-weights"])
@pytest.mark.parametrize("name, what", [("nope.pth", "does not exist"),
                                        ("weights", "is a folder, not a weights file")])
def test_fid_weights_given_but_unusable_are_refused_before_any_work(loads, tmp_path, option,
                                                                     name, what):
    (tmp_path / "weights").mkdir()
    line = refused(invoke(eval_cli, tmp_path / "run", "--suite", "fid", "--n", 4, option, name))
    assert line == f"Error: {option} {name!r} {what}"
    assert loads == []


def test_a_text_file_as_inception_weights_is_one_plain_line(loads, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    line = refused(invoke(eval_cli, tmp_path / "run", "--suite", "fid", "--n", 4,
                          "--inception-weights", "prompts.txt"))
    assert line == ("Error: --inception-weights 'prompts.txt' is not a weights file t2i can read "
                    "(torchvision's inception_v3 state dict: .pth or .safetensors)")
    assert loads == []


def test_a_text_file_as_clip_weights_is_one_plain_line(loads, tmp_path):
    pytest.importorskip("open_clip")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    line = refused(invoke(eval_cli, tmp_path / "run", "--suite", "fid", "--n", 4,
                          "--clip-weights", "prompts.txt"))
    assert line == ("Error: --clip-weights 'prompts.txt' is not open_clip ViT-B-32 weights t2i "
                    "can read (another --clip-model's, damaged, or no weights file)")
    unknown = refused(invoke(eval_cli, tmp_path / "run", "--suite", "fid", "--n", 4,
                             "--clip-weights", "prompts.txt", "--clip-model", "ViT-Nope"))
    assert unknown == ("Error: --clip-model 'ViT-Nope' is not an open_clip model (e.g. "
                       "ViT-B-32); see open_clip.list_models()")
    assert loads == []
