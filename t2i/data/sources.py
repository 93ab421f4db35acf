"""Resolve a `data.source` string to the list of webdataset shard files it names.

Accepted forms (comma-separated lists mix freely):
  /path/to/folder           every *.tar (any case) directly inside (sorted)
  /path/to/shards-*.tar     a glob
  /path/to/one.tar          a single shard
  https://host/x.tar        a URL (checked when streaming starts)
  hf://owner/name           a Hub dataset: the subset's folder for jackyhate/text-to-image-2M,
                            else every .tar in the repository
  hf://owner/name/folder    the .tar files under a folder of a Hub dataset
The Hub is listed (never a hard-coded shard count); offline or unreachable gives a DataError.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from t2i.data.errors import DataError

# Subset -> folder of the known text-to-image-2M layout.
HUB_SUBSETS = {
    "jackyhate/text-to-image-2M": {"512": "data_512_2M", "1024": "data_1024_10K"},
}


@dataclass(frozen=True)
class Shard:
    url: str  # a local path, an https:// URL or an hf://datasets/... URL
    size: int | None = None  # bytes, when known without reading it


def resolve_shards(source: str, subset: str = "512") -> list[Shard]:
    """All shards `source` names, in a stable (sorted per item) order, each once. Raises
    DataError with one line naming the path when nothing is found."""
    if not source or not source.strip():
        raise DataError("data.source is empty: give a folder or glob of .tar shards, "
                        "hf://owner/name, URLs, or 'shapes'")
    shards: list[Shard] = []
    for item in (part.strip() for part in source.split(",")):
        if not item:
            continue
        if item.startswith("hf://"):
            shards += list_hub_shards(item, subset)
        elif item.startswith(("http://", "https://", "s3://", "gs://")):
            shards.append(Shard(item))
        else:
            shards += list_local_shards(item)
    if not shards:
        raise DataError(f"data source {source!r} names no shards")
    return unique(shards)


def unique(shards: list[Shard]) -> list[Shard]:
    """`shards` without repeats (first kept): items that overlap (`dir,dir/data_000000.tar`)
    would read a shard twice per pass, possibly on two ranks at once."""
    seen: set[str] = set()
    out = []
    for shard in shards:
        key = shard.url if "://" in shard.url else os.path.realpath(shard.url)
        if key not in seen:
            seen.add(key)
            out.append(shard)
    return out


def is_remote(item: str) -> bool:
    """An item of a source that is not a local path: hf://, a URL, or the built-in "shapes"."""
    return "://" in item or item == "shapes"


def absolute_source(source: str) -> str:
    """`source` with its local items made absolute (a glob keeps its pattern; `~` expanded), so
    a run's config names the same data from any working directory, and `data` and `./data` are
    one source; remote items and "shapes" unchanged, empty items dropped."""
    items = (item.strip() for item in source.split(","))
    return ",".join(item if is_remote(item) else os.path.abspath(os.path.expanduser(item))
                    for item in items if item)


def list_local_shards(item: str) -> list[Shard]:
    path = Path(item).expanduser()
    if any(ch in item for ch in "*?["):
        files = sorted(p for p in glob.glob(str(path)) if os.path.isfile(p))
        if not files:
            raise DataError(f"data source {item!r}: the pattern matches no files")
    elif path.is_dir():
        files = sorted(str(p) for p in path.iterdir()
                       if p.suffix.lower() == ".tar" and p.is_file())
        if not files:
            raise DataError(f"data source {item!r}: the folder holds no .tar shards")
    elif path.is_file():
        files = [str(path)]
    else:
        raise DataError(f"data source {item!r} does not exist")
    return [Shard(f, os.path.getsize(f)) for f in files]


def split_hub_item(item: str, subset: str) -> tuple[str, str]:
    """hf://owner/name[/folder] -> (repo id, folder inside the repo, '' for all)."""
    parts = [p for p in item[len("hf://"):].split("/") if p]
    if parts and parts[0] == "datasets":
        parts = parts[1:]
    if len(parts) < 2:
        raise DataError(f"data source {item!r}: expected hf://owner/name[/folder]")
    repo = f"{parts[0]}/{parts[1]}"
    folder = "/".join(parts[2:])
    if not folder and repo in HUB_SUBSETS:
        subsets = HUB_SUBSETS[repo]
        if subset not in subsets:
            raise DataError(f"data source {item!r}: unknown subset {subset!r}; "
                            f"choose one of {', '.join(subsets)}")
        folder = subsets[subset]
    return repo, folder


def list_hub_shards(item: str, subset: str) -> list[Shard]:
    """List the .tar files of a Hub dataset folder (one API call) as hf:// URLs."""
    repo, folder = split_hub_item(item, subset)
    where = f"hf://{repo}" + (f"/{folder}" if folder else "")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DataError(f"cannot list {where}: HF_HUB_OFFLINE is set and the Hub is needed "
                        f"(download the shards and pass their local folder instead)")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        entries = HfApi().list_repo_tree(repo, path_in_repo=folder or None, recursive=True,
                                         repo_type="dataset")
        files = [e for e in entries if getattr(e, "path", "").lower().endswith(".tar")
                 and hasattr(e, "size")]
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise DataError(f"cannot list {where}: no such dataset or folder on the Hub") from None
    except Exception as err:  # offline mode, DNS, timeouts: one line, not a traceback
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"cannot reach the Hugging Face Hub for {where} "
                        f"({type(err).__name__}: {detail[:160]})") from None
    if not files:
        raise DataError(f"{where} holds no .tar shards")
    return [Shard(f"hf://datasets/{repo}/{f.path}", f.size)
            for f in sorted(files, key=lambda f: f.path)]


def is_empty_shard(shard: Shard) -> bool:
    """True for a shard that certainly holds no sample, known without streaming it: 0 bytes,
    or a local tar whose first block is the all-zero end-of-archive block. A file too short
    for one header is not "empty" but cut: reading it reports the damage."""
    if shard.size == 0:
        return True
    if "://" in shard.url:
        return False  # a remote shard found empty while streaming is skipped and reported
    try:
        with open(shard.url, "rb") as f:
            first = f.read(512)
    except OSError:
        return False  # reading it will report why
    return len(first) == 512 and first.count(0) == 512


def shard_name(url: str) -> str:
    """Short, stable name of a shard for logs and positions."""
    return url.rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------------------------
# Held-out shards for the validation loss (data.val_source / data.val_fraction)
# ----------------------------------------------------------------------------------------------


def val_hash(name: str) -> float:
    """A shard file name's place in [0, 1): the first 8 bytes of sha256(name) over 2**64. It
    depends on the name alone, so a shard's split never changes with the order or the number of
    the other shards."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


def split_validation(shards: list[Shard], val_fraction: float) -> tuple[list[Shard], list[Shard]]:
    """(training shards, validation shards), each in the given order: a shard is held out when
    val_hash(its file name) < `val_fraction`; when no shard is, the non-empty one with the
    smallest hash (a small fraction of few shards still holds one out). Raises DataError when
    that leaves no training shard."""
    if val_fraction <= 0:
        return list(shards), []
    held = {i for i, s in enumerate(shards) if val_hash(shard_name(s.url)) < val_fraction}
    if not held and shards:
        held = {min(range(len(shards)), key=lambda i: (is_empty_shard(shards[i]),
                                                       val_hash(shard_name(shards[i].url)), i))}
    if len(held) == len(shards):
        raise DataError(f"data.val_fraction {val_fraction:g} holds out all {len(shards)} shard(s) "
                        f"of the source: lower it, or give held-out shards with data.val_source")
    return ([s for i, s in enumerate(shards) if i not in held],
            [s for i, s in enumerate(shards) if i in held])


def validation_shards(source: str, subset: str, val_source: str, val_fraction: float,
                      option: str = "data.val_source") -> list[Shard]:
    """The held-out shards: every shard of `val_source`, else `val_fraction` of `source`'s
    (split_validation, over every shard the source names), else none. Raises DataError as
    resolve_shards does, naming `option` (what gave `val_source`) for its errors."""
    if val_source.strip():
        try:
            return resolve_shards(val_source, subset)
        except DataError as err:
            raise DataError(f"{option}: {err}") from None
    if val_fraction <= 0:
        return []
    return split_validation(resolve_shards(source, subset), val_fraction)[1]


def without_validation(urls: tuple[str, ...], source: str, subset: str, val_source: str,
                       val_fraction: float) -> tuple[str, ...]:
    """The training shards: `urls` (of `source`) less the held-out ones of validation_shards,
    matched by URL, so training and validation split one list the same way. Raises DataError
    when nothing is left to train on."""
    held = {s.url for s in validation_shards(source, subset, val_source, val_fraction)}
    kept = tuple(url for url in urls if url not in held)
    if held and not kept:
        raise DataError(f"data source {source!r}: every shard is held out for validation "
                        f"(data.val_source / data.val_fraction)")
    return kept
