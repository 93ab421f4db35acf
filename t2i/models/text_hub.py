"""Finding open_clip's pretrained text weights without waiting on a network that is not there.

open_clip's own `download_pretrained` asks the Hugging Face Hub about every candidate file
with five retries each, so on an offline machine a tag costs ~50 s and ten `Retrying in 8s`
lines before it fails. `pretrained_file` looks first where open_clip's download would have put
the file (the Hub cache, `HF_HUB_CACHE`, or `~/.cache/clip` for URL-only tags); on a miss it
fails at once when `HF_HUB_OFFLINE` is set or one quick request (a 5 s timeout, no retry)
cannot reach the host, with the commands that fetch the file elsewhere and pass it here; only
then does it let open_clip download.
"""

from __future__ import annotations

import os
from pathlib import Path

from t2i.config import ConfigError

PROBE_TIMEOUT_S = 5.0
# open_clip's defaults for an `hf_hub` entry without a file name (open_clip/constants.py)
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
_TRUE = ("1", "on", "yes", "true")


class TextWeightsError(ConfigError):
    """The configured text weights could not be found, downloaded or matched; the message says
    why and what to set instead (a ConfigError, so the CLI prints it as one line)."""


def hub_files(pretrained_cfg: dict) -> tuple[str, list[str]] | None:
    """(repo id, file names in the order open_clip tries them: safetensors first) of a tag's
    `hf_hub` entry, or None for a tag without one."""
    entry = pretrained_cfg.get("hf_hub", "")
    if not entry:
        return None
    repo_id, filename = os.path.split(entry)
    if not filename or filename == HF_WEIGHTS_NAME:
        return repo_id, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return repo_id, [filename[:-4] + ".safetensors", filename]
    return repo_id, [filename]


def cached_file(pretrained_cfg: dict) -> Path | None:
    """The tag's weights file where open_clip's download keeps it, if present (no network):
    the Hugging Face cache (read at call time, so `HF_HUB_CACHE` applies) for hub tags, else
    `~/.cache/clip/<name>` for URL tags."""
    from huggingface_hub import constants, try_to_load_from_cache

    files = hub_files(pretrained_cfg)
    if files is None:
        url = pretrained_cfg.get("url", "")
        path = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        return path if url and path.is_file() else None
    repo_id, names = files
    for name in names:
        found = try_to_load_from_cache(repo_id, name, cache_dir=constants.HF_HUB_CACHE)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def offline_reason(pretrained_cfg: dict) -> str | None:
    """Why a download cannot work now (`HF_HUB_OFFLINE` set, or the host did not answer one
    request within PROBE_TIMEOUT_S), or None when the host answered (any HTTP status)."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    url = constants.ENDPOINT if hub_files(pretrained_cfg) else pretrained_cfg.get("url", "")
    try:
        get_session().head(url, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean no network
        return f"cannot reach {url} ({type(err).__name__}: {err})"
    return None


def how_to_fetch(model: str, tag: str, pretrained_cfg: dict) -> str:
    """The commands that fetch a tag's weights on a machine with network and use them here."""
    files = hub_files(pretrained_cfg)
    fetch = (f"`hf download {files[0]} {files[1][0]} --local-dir DIR`" if files
             else f"the file {pretrained_cfg.get('url', '')}")
    path = f"DIR/{files[1][0]}" if files else "PATH"
    return (f"Fetch the weights on a machine with network ({fetch}, or "
            f"open_clip.download_pretrained(open_clip.get_pretrained_cfg({model!r}, {tag!r}))), "
            f"then either copy its Hugging Face cache folder to $HF_HUB_CACHE here, or copy the "
            f"file and pass it with --text-encoder PATH (here {path}; or --set text.weights=PATH "
            f"--set text.pretrained=){quick_gelu_hint(model, pretrained_cfg)}")


def quick_gelu_hint(model: str, pretrained_cfg: dict) -> str:
    """For a tag trained with QuickGELU (OpenAI's): the architecture name that keeps it when the
    weights come from a file (the activation is not in the weights)."""
    import open_clip

    quick = f"{model}-quickgelu"
    if not pretrained_cfg.get("quick_gelu") or open_clip.get_model_config(quick) is None:
        return ""
    return f", adding --set text.model={quick} (these weights were trained with QuickGELU)"


def pretrained_file(model: str, tag: str) -> Path:
    """Local path of open_clip's weights for (model, tag): from the cache, else downloaded by
    open_clip. Raises TextWeightsError for an unknown tag, and at once (before any retry) when
    the file is not cached and the machine is offline, saying how to pass a local file."""
    import open_clip

    pretrained_cfg = open_clip.get_pretrained_cfg(model, tag)
    if not pretrained_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "(none)"
        raise TextWeightsError(f"open_clip has no pretrained tag {tag!r} for {model!r}; "
                               f"known tags: {tags}")
    found = cached_file(pretrained_cfg)
    if found is not None:
        return found
    reason = offline_reason(pretrained_cfg)
    if reason is not None:
        raise TextWeightsError(f"could not download open_clip weights {model}/{tag} (offline: "
                               f"{reason}; not in the cache). "
                               + how_to_fetch(model, tag, pretrained_cfg))
    try:
        path = open_clip.download_pretrained(pretrained_cfg)
    except Exception as err:  # noqa: BLE001 - any network/hub failure gets the same advice
        raise TextWeightsError(f"could not download open_clip weights {model}/{tag} "
                               f"({type(err).__name__}: {err}). "
                               + how_to_fetch(model, tag, pretrained_cfg)) from err
    if not path:
        raise TextWeightsError(f"open_clip returned no file for {model}/{tag}")
    return Path(path)
