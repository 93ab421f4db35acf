"""Errors of the data layer: a source that cannot feed a run, and one bad sample."""

from __future__ import annotations

# Kinds of bad samples, in the order they are checked. Each is skipped, counted and logged.
BAD_KINDS = (
    "duplicate_file",  # two files with one key and extension (KEY.jpg and KEY.JPG)
    "no_image",        # a caption (JSON/.txt) with no image file under the same key
    "no_caption",      # an image with neither KEY.json nor KEY.txt
    "bad_json",        # KEY.json is not valid UTF-8 JSON or not an object (and no KEY.txt)
    "no_prompt",       # KEY.json has no string "prompt" (and no KEY.txt), or KEY.txt is not UTF-8
    "empty_prompt",    # the prompt is empty or only whitespace
    "corrupt_image",   # the image bytes do not decode (truncated, not an image, too many pixels)
    "too_small",       # shorter side under a quarter of the training resolution
    "bad_aspect",      # longer side more than 4x the shorter: a centre crop would keep little
    "no_latent",       # a latent shard's sample without moments at the run's resolution
    "corrupt_latent",  # its moments file does not decode to a (2z, h, w) tensor
)


class DataError(RuntimeError):
    """A data source cannot feed the run (missing path, no shards, offline Hub, too many bad
    samples). The message is one line and names the source."""


class BadSample(Exception):
    """One sample that must be skipped; `kind` is one of BAD_KINDS."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail
