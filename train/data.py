"""Training data: webdataset streams of images (img2dataset layout) or precomputed latents.

Two shard layouts, both plain tar files readable by webdataset:

- image shards (img2dataset): KEY.png|jpg|jpeg|webp, KEY.txt (caption), optional KEY.json
  (`width`, `height`, and `original_width`/`original_height` when img2dataset resized);
- latent shards (written by `scripts/precompute_latents.py`): KEY.latents.npy,
  KEY.prompt_embeds.npy, KEY.pooled.npy, KEY.time_ids.npy, KEY.txt. Arrays are `.npy`
  bytes read with `allow_pickle=False`: nothing in a shard can execute code.

Training streams are *resampled*: every (rank, DataLoader worker) draws shards with
replacement from its own RNG, forever, so the loop simply calls `next()`. The RNG seed is a
hash of (seed, rank, resume_step, worker): different ranks see different streams, and a run
resumed at step k starts a fresh stream instead of replaying the samples it already trained
on (ARCHITECTURE.md pitfall 7). The single-pass reader (`image_loader_single_pass`) is the
deterministic, non-resampled order used to precompute latents.

Bad samples (unreadable shard, corrupt tar, undecodable or truncated image, missing or empty
caption, an aspect ratio beyond 1:16) are skipped with a warning naming the sample key and
counted by reason. Images that are not 8-bit RGB are converted deliberately and counted by
kind (`to_rgb8`): 16-bit grayscale scaled by 1/257 (PIL's convert("RGB") clips it: a 16-bit
PNG comes out nearly white), alpha composited on white (convert("RGB") drops it and shows the
colour under transparent pixels, often black), grayscale, palette and CMYK through PIL's
conversions. A JSON sidecar that does not parse is counted (`invalid_json`) and ignored.

Before any model loads, `check_training_data` expands the shard pattern and checks that every
local shard exists and is a tar file with a member, and that the shards hold a usable sample:
the error names the pattern and the first missing or unreadable file. While training, data
that yields nothing is a `DataError` too (a one-line user error): too many shards in a row
without a sample, too many unusable samples in a row. It reaches the training process as an
item of the stream, not as an exception re-raised by a DataLoader worker (which would carry
the worker's traceback). The counts live in the process that decodes (a DataLoader worker
when num_workers > 0), so every batch carries its worker's cumulative counts and
`SampleStream.skip_counts` / `converted_counts` sum the latest counts of each worker in the
training process. Skips after a worker's last delivered batch are reported with its next batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.conditioning import Conditioning
from train.config import DataConfig
from train.errors import DataError
from train.stop import ignore_stop_signals

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
LATENT_FIELDS = ("latents.npy", "prompt_embeds.npy", "pooled.npy", "time_ids.npy")
# A resampled stream that opens this many shards in a row without one sample, or decodes
# this many unusable samples in a row, is broken (all shards missing, corrupt, or of another
# layout): raise instead of warning forever.
MAX_EMPTY_SHARDS_IN_A_ROW = 100
MAX_BAD_SAMPLES_IN_A_ROW = 1000
MAX_ASPECT = 16  # longer / shorter side; beyond it a square crop is a sliver (and resizing costly)
FIX_DATA = ("check data.train_shards: webdataset tar files in img2dataset layout "
            "(KEY.jpg|png with KEY.txt captions), or data.latent_shards")


@dataclass(frozen=True)
class ImageBatch:
    """B images ready for the VAE, with their captions and SDXL micro-conditioning.

    pixels: (B, 3, H, W) float32 in [-1, 1].
    time_ids: (B, 6) float32 (orig_h, orig_w, crop_top, crop_left, target_h, target_w),
        height first (pitfall 4); crops in the coordinates of the resized image.
    skip_counts: cumulative skipped samples by reason in the worker that built this batch.
    converted_counts: cumulative images converted to 8-bit RGB by kind, and other notes
        (`invalid_json`), in that worker.
    """

    pixels: Tensor
    captions: list[str]
    time_ids: Tensor
    keys: list[str]
    worker: int
    skip_counts: dict[str, int]
    converted_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LatentBatch:
    """B precomputed VAE latents (already times scaling_factor) and their text conditioning."""

    latents: Tensor
    cond: Conditioning
    captions: list[str]
    keys: list[str]
    worker: int
    skip_counts: dict[str, int]
    converted_counts: dict[str, int] = field(default_factory=dict)


class SkipCounter:
    """Skipped samples by reason, and used samples by conversion, in the process that decodes
    them; logs each skip (unless quiet), and each kind of conversion the first time."""

    def __init__(self, quiet: bool = False) -> None:
        self.counts: dict[str, int] = {}
        self.converted: dict[str, int] = {}
        self.quiet = quiet
        self.shard: tuple[int, str] = (-1, "")  # (visit number, url) of the shard being read
        self._failed_visit = -2

    def skip(self, reason: str, where: str, detail: object = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if not self.quiet:
            logger.warning("skipping sample %s (%s): %s", where, reason, detail)

    def note(self, kind: str, where: str) -> None:
        """A sample used after a deliberate conversion (or with its metadata ignored)."""
        if kind not in self.converted and not self.quiet:
            logger.info("using %s samples (first: %s); counted in data_converted", kind, where)
        self.converted[kind] = self.converted.get(kind, 0) + 1

    def tar_handler(self, exn: Exception) -> bool:
        """webdataset handler hook: count a shard-level error once per shard, go to the next.

        webdataset may report one torn tar twice (member read, then the tar iterator);
        counting per shard visit keeps "corrupt_tar" = shards abandoned.
        """
        visit, url = self.shard
        if visit != self._failed_visit:
            self._failed_visit = visit
            unreadable = isinstance(exn, OSError) and not isinstance(exn, tarfile.TarError)
            self.skip("unreadable_shard" if unreadable else "corrupt_tar", url, repr(exn))
        return True


B = TypeVar("B", ImageBatch, LatentBatch)


@dataclass(frozen=True)
class _StreamFailure:
    """A DataError travelling from a DataLoader worker to the training process as data."""

    error: DataError


class SampleStream(Generic[B]):
    """Batches from a DataLoader, plus the skip counts summed over its workers.

    Iterate it once and keep the iterator: each new iteration restarts the workers and
    replays the stream from its seed.
    """

    def __init__(self, dataset: IterableDataset, num_workers: int) -> None:
        self._loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                  worker_init_fn=ignore_stop_signals if num_workers else None)
        self._latest: dict[int, dict[str, int]] = {}
        self._latest_converted: dict[int, dict[str, int]] = {}

    @property
    def skip_counts(self) -> dict[str, int]:
        return _summed(self._latest)

    @property
    def converted_counts(self) -> dict[str, int]:
        return _summed(self._latest_converted)

    def __iter__(self) -> Iterator[B]:
        for batch in self._loader:
            if isinstance(batch, _StreamFailure):
                raise batch.error
            self._latest[batch.worker] = batch.skip_counts
            self._latest_converted[batch.worker] = batch.converted_counts
            yield batch


def _summed(per_worker: dict[int, dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in per_worker.values():
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + n
    return total


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard paths from a path, a brace pattern ("dir/train-{000000..000003}.tar") or a list.

    Raises DataError when there are none, or when they are local files and none exists (some
    missing ones are skipped and counted as unreadable shards)."""
    out = _expanded(urls)
    local = [u for u in out if _is_local(u)]
    if local and len(local) == len(out) and not any(Path(u).is_file() for u in local):
        shown = out[0] if len(out) == 1 else f"{out[0]} ... {out[-1]}, {len(out)} paths"
        raise DataError("no shard file exists", shown, FIX_DATA)
    return out


def _expanded(urls: str | Sequence[str]) -> list[str]:
    patterns = [urls] if isinstance(urls, (str, Path)) else list(urls)
    out = [str(u) for p in patterns for u in braceexpand.braceexpand(str(p))]
    if not out:
        raise DataError("no shards given", repr(urls), FIX_DATA)
    return out


def check_training_data(data_cfg: DataConfig, shards: str) -> None:
    """Before any model loads (main process): the shards the training stream will read exist,
    are tar files with a first member, and hold a usable sample. Raises a DataError naming the
    pattern and the first missing or unreadable file. Remote shards (URLs, `pipe:`) are left
    to the stream."""
    if data_cfg.latent_shards:
        key, pattern, decode = "data.latent_shards", data_cfg.latent_shards, _latent_decoder
    else:
        key, pattern = "data.train_shards", shards
        decode = _image_decoder(data_cfg.resolution, data_cfg.center_crop, "image")
    urls = _expanded(pattern.split(" ") if " " in pattern else pattern)
    local = [u for u in urls if _is_local(u)]
    where = f"{key}={pattern}" if len(pattern) <= 200 else f"{key}={pattern[:200]}..."
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        what = ("no shard file exists" if len(missing) == len(urls)
                else f"{len(missing)} of {len(urls)} shard files are missing")
        raise DataError(f"{what}, the first: {missing[0]}", where, FIX_DATA)
    for url in local:
        problem = _tar_problem(url)
        if problem:
            raise DataError(f"shard {url} {problem}", where, FIX_DATA)
    _check_usable_sample(local, decode, where)


def _tar_problem(path: str) -> str | None:
    """Why a shard is not a readable tar file with a member (None: it is), from its first
    header only: a check of 10,000 shards costs 10,000 small reads."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            first = next(iter(tar), None)
    except (tarfile.TarError, OSError, EOFError) as exn:
        return f"is not a readable tar file ({type(exn).__name__}: {str(exn)[:120]})"
    return None if first is not None else "is an empty tar file (no member)"


def _check_usable_sample(urls: list[str], decode: Callable, where: str) -> None:
    """Decode samples in shard order until one is usable, as the stream will; raise after
    MAX_BAD_SAMPLES_IN_A_ROW unusable ones or the end of the shards."""
    if not urls:
        return
    counter = SkipCounter(quiet=True)

    def shard_dicts() -> Iterator[dict]:
        for visit, url in enumerate(urls):
            counter.shard = (visit, url)
            yield {"url": url}

    rng, seen = random.Random(0), 0
    for sample in wds.tarfile_samples(shard_dicts(), handler=counter.tar_handler):
        if decode(sample, rng, counter) is not None:
            return
        seen += 1
        if seen >= MAX_BAD_SAMPLES_IN_A_ROW:
            break
    raise DataError(f"no usable sample among the first {seen} of the shards (skipped: {counter.counts})",
                    where, "check the images and captions in the shards; " + FIX_DATA)


def stream_seed(*parts: object) -> int:
    """A 64-bit seed from (seed, rank, resume_step, worker, purpose); stable across runs."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


@dataclass(frozen=True)
class _ShardPlan:
    urls: tuple[str, ...]
    resampled: bool
    seed: int
    rank: int
    world_size: int
    resume_step: int

    def worker_seed(self, worker: int, purpose: str) -> int:
        return stream_seed(self.seed, self.rank, self.resume_step, worker, purpose)

    def shards(self, worker: int, num_workers: int) -> Iterator[str]:
        """This (rank, worker)'s shards: a disjoint slice of the list, resampled or in order."""
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        mine = self.urls[slot::slots]
        if not self.resampled:
            yield from mine
            return
        # Fewer shards than streams: every stream resamples all shards; seeds still differ.
        mine = mine if len(self.urls) >= slots else self.urls
        rng = random.Random(self.worker_seed(worker, "shards"))
        while True:
            yield rng.choice(mine)


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


class _BatchStream(IterableDataset):
    """Shards → tar samples → decoded items → shuffle buffer → batches, per worker."""

    def __init__(self, plan: _ShardPlan, decode: Callable, collate: Callable, *,
                 batch_size: int, shuffle_buffer: int, drop_last: bool) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.plan, self.decode, self.collate = plan, decode, collate
        self.batch_size, self.shuffle_buffer, self.drop_last = batch_size, shuffle_buffer, drop_last

    def __iter__(self) -> Iterator:
        try:
            yield from self._batches()
        except DataError as err:
            yield _StreamFailure(err)

    def _where(self) -> str:
        urls = self.plan.urls
        return urls[0] if len(urls) == 1 else f"{urls[0]} ... {urls[-1]}, {len(urls)} shards"

    def _batches(self) -> Iterator:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter()
        raw_samples = [0]

        def shard_dicts() -> Iterator[dict]:
            empty, last = 0, 0
            for visit, url in enumerate(self.plan.shards(worker, num_workers)):
                counter.shard = (visit, url)
                empty, last = (empty + 1, last) if raw_samples[0] == last else (0, raw_samples[0])
                if self.plan.resampled and empty > MAX_EMPTY_SHARDS_IN_A_ROW:
                    raise DataError(f"{empty} shards in a row held no sample (skips so far: "
                                    f"{counter.counts})", self._where(), FIX_DATA)
                yield {"url": url}

        def counted(samples: Iterable[dict]) -> Iterator[dict]:
            for sample in samples:
                raw_samples[0] += 1
                yield sample

        # Shuffle the raw (still compressed) samples, then decode: the buffer then holds
        # encoded bytes, not decoded pixels (1000 SDXL images would be 3 GB per worker).
        stream = counted(wds.tarfile_samples(shard_dicts(), handler=counter.tar_handler))
        if self.shuffle_buffer > 1:
            rng = random.Random(self.plan.worker_seed(worker, "shuffle"))
            stream = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)
        decode_rng = random.Random(self.plan.worker_seed(worker, "decode"))
        chunk, bad_in_a_row = [], 0
        for sample in stream:
            item = self.decode(sample, decode_rng, counter)
            if item is None:
                bad_in_a_row += 1
                if self.plan.resampled and bad_in_a_row > MAX_BAD_SAMPLES_IN_A_ROW:
                    raise DataError(f"{bad_in_a_row} samples in a row were unusable (skips so far: "
                                    f"{counter.counts})", self._where(),
                                    "check the images and captions in the shards (the warnings name "
                                    "the samples); " + FIX_DATA)
                continue
            bad_in_a_row = 0
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield self.collate(chunk, worker, dict(counter.counts), dict(counter.converted))
                chunk = []
        if chunk and not self.drop_last:
            yield self.collate(chunk, worker, dict(counter.counts), dict(counter.converted))


# ---------------------------------------------------------------- images


def resize_and_crop(image: Image.Image, resolution: int, *, center_crop: bool,
                    rng: random.Random) -> tuple[Image.Image, int, int]:
    """Resize the shorter side to `resolution`, crop a square; return (image, top, left)."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:  # same rounding as diffusers' train_text_to_image_sdxl.py
        top, left = round((new_h - resolution) / 2), round((new_w - resolution) / 2)
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    return image.crop((left, top, left + resolution, top + resolution)), top, left


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
KIND_BY_MODE = {"L": "grayscale", "1": "grayscale", "P": "palette", "CMYK": "cmyk"}
WHITE = (255, 255, 255, 255)


def to_rgb8(image: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB from any decoded mode, and the kind of conversion (None: it was 8-bit RGB).

    - "16bit": 16-bit grayscale (PNG's I;16) scaled by 1/257 to the full 8-bit range; PIL's
      convert("RGB") clips it at 255, and a 16-bit PNG comes out nearly white. (PIL decodes
      16-bit RGB and RGBA PNGs to 8 bits itself, from the high bytes: the full range.)
    - "alpha": RGBA, LA, PA, or a transparent palette colour, composited on white;
      convert("RGB") would drop alpha and show the colour under transparent pixels (often black).
    - "grayscale", "palette", "cmyk", "other_mode" (YCbCr, LAB, HSV, F): PIL's conversion.
    """
    kind = None
    if image.mode in SIXTEEN_BIT_MODES:
        gray = np.asarray(image, dtype=np.float64) / 257.0
        image, kind = Image.fromarray(np.clip(np.round(gray), 0, 255).astype(np.uint8)), "16bit"
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB"), kind or "alpha"
    if image.mode == "RGB":
        return image, kind
    return image.convert("RGB"), kind or KIND_BY_MODE.get(image.mode, "other_mode")


ORIGINAL_SIZE_SOURCES = ("image", "metadata")


def _sidecar(sample: dict, key: str, counter: SkipCounter) -> dict | None:
    """The sample's JSON sidecar as a dict; one that does not parse (or is no JSON object) is
    counted as `invalid_json` and ignored: it is optional metadata, the image is still used."""
    raw = sample.get("json")
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        counter.note("invalid_json", key)
        return None
    return info


def _original_size(info: dict | None, image: Image.Image, source: str) -> tuple[int, int]:
    """SDXL's original (height, width): the decoded image's, or with source="metadata"
    img2dataset's `original_height`/`original_width` (the size before its resize), falling
    back to the decoded size where the json lacks them."""
    if source == "metadata" and info:
        h, w = info.get("original_height"), info.get("original_width")
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            return h, w
    return image.height, image.width


@dataclass(frozen=True)
class _ImageItem:
    key: str
    pixels: np.ndarray  # (H, W, 3) uint8
    caption: str
    time_ids: tuple[int, int, int, int, int, int]


def _image_decoder(resolution: int, center_crop: bool, original_size: str) -> Callable:
    if original_size not in ORIGINAL_SIZE_SOURCES:
        raise ValueError(f"original_size must be one of {ORIGINAL_SIZE_SOURCES}, "
                         f"got {original_size!r}")

    def decode(sample: dict, rng: random.Random, counter: SkipCounter) -> _ImageItem | None:
        key = f"{sample.get('__url__')}:{sample['__key__']}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            counter.skip("missing_image", key, sorted(k for k in sample if not k.startswith("__")))
            return None
        if "txt" not in sample:
            counter.skip("missing_caption", key)
            return None
        try:
            caption = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exn:
            counter.skip("bad_caption", key, repr(exn))
            return None
        if not caption:
            counter.skip("empty_caption", key)
            return None
        try:
            with Image.open(io.BytesIO(sample[ext])) as raw:
                raw.load()
                image, converted = to_rgb8(raw)
        except UnidentifiedImageError as exn:
            counter.skip("undecodable_image", key, repr(exn))
            return None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
            counter.skip("corrupt_image", key, repr(exn))
            return None
        if max(image.size) > MAX_ASPECT * min(image.size):
            counter.skip("extreme_aspect", key, f"{image.width}x{image.height}")
            return None
        if converted:
            counter.note(converted, key)
        orig_h, orig_w = _original_size(_sidecar(sample, key, counter), image, original_size)
        image, top, left = resize_and_crop(image, resolution, center_crop=center_crop, rng=rng)
        time_ids = (orig_h, orig_w, top, left, resolution, resolution)
        return _ImageItem(sample["__key__"], np.asarray(image), caption, time_ids)

    return decode


def _collate_images(items: list[_ImageItem], worker: int, skips: dict[str, int],
                    converted: dict[str, int]) -> ImageBatch:
    pixels = torch.from_numpy(np.stack([it.pixels for it in items])).permute(0, 3, 1, 2)
    return ImageBatch(
        pixels=pixels.float() / 127.5 - 1.0,
        captions=[it.caption for it in items],
        time_ids=torch.tensor([it.time_ids for it in items], dtype=torch.float32),
        keys=[it.key for it in items],
        worker=worker,
        skip_counts=skips,
        converted_counts=converted,
    )


def image_loader(urls: str | Sequence[str], *, batch_size: int, resolution: int, seed: int,
                 rank: int, world_size: int, resume_step: int, center_crop: bool = True,
                 shuffle_buffer: int = 1000, num_workers: int = 0,
                 original_size: str = "image") -> SampleStream[ImageBatch]:
    """Infinite resampled stream of ImageBatch for training; seeded by (seed, rank, resume_step).

    original_size: where time_ids' (orig_h, orig_w) come from, "image" (the decoded size) or
        "metadata" (img2dataset's json `original_height`/`original_width`).
    """
    _check_rank(rank, world_size)
    plan = _ShardPlan(tuple(expand_urls(urls)), True, seed, rank, world_size, resume_step)
    decode = _image_decoder(resolution, center_crop, original_size)
    dataset = _BatchStream(plan, decode, _collate_images,
                           batch_size=batch_size, shuffle_buffer=shuffle_buffer, drop_last=True)
    return SampleStream(dataset, num_workers)


def image_loader_single_pass(urls: str | Sequence[str], *, batch_size: int, resolution: int,
                             rank: int, world_size: int, center_crop: bool = True, seed: int = 0,
                             num_workers: int = 0, original_size: str = "image"
                             ) -> SampleStream[ImageBatch]:
    """Every sample of this rank's shards once, no shuffle; the last batch may be short.

    Rank r reads shards r, r + world_size, ... in order (with num_workers > 0 the workers split
    them further and their batches arrive round-robin, still deterministic). `seed` only
    matters for random crops. `original_size` as in `image_loader`.
    """
    _check_rank(rank, world_size)
    plan = _ShardPlan(tuple(expand_urls(urls)), False, seed, rank, world_size, 0)
    decode = _image_decoder(resolution, center_crop, original_size)
    dataset = _BatchStream(plan, decode, _collate_images,
                           batch_size=batch_size, shuffle_buffer=0, drop_last=False)
    return SampleStream(dataset, num_workers)


# ---------------------------------------------------------------- precomputed latents


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _latent_decoder(sample: dict, rng: random.Random, counter: SkipCounter) -> dict | None:
    key = f"{sample.get('__url__')}:{sample['__key__']}"
    missing = [f for f in LATENT_FIELDS if f not in sample]
    if missing:
        counter.skip("missing_field", key, missing)
        return None
    try:
        arrays = {f: np.load(io.BytesIO(sample[f]), allow_pickle=False) for f in LATENT_FIELDS}
    except (ValueError, OSError, EOFError) as exn:
        counter.skip("bad_array", key, repr(exn))
        return None
    caption = sample.get("txt", b"").decode("utf-8", errors="replace")
    return {"key": sample["__key__"], "caption": caption, **arrays}


def _collate_latents(items: list[dict], worker: int, skips: dict[str, int],
                     converted: dict[str, int]) -> LatentBatch:
    def stack(field: str) -> Tensor:
        return torch.from_numpy(np.stack([it[field] for it in items])).float()

    cond = Conditioning(stack("prompt_embeds.npy"), stack("pooled.npy"), stack("time_ids.npy"))
    return LatentBatch(stack("latents.npy"), cond, [it["caption"] for it in items],
                       [it["key"] for it in items], worker, skips, converted)


def latent_loader(urls: str | Sequence[str], *, batch_size: int, seed: int, rank: int,
                  world_size: int, resume_step: int, shuffle_buffer: int = 1000,
                  num_workers: int = 0) -> SampleStream[LatentBatch]:
    """Infinite resampled stream of LatentBatch from precomputed shards (float32 tensors)."""
    _check_rank(rank, world_size)
    plan = _ShardPlan(tuple(expand_urls(urls)), True, seed, rank, world_size, resume_step)
    dataset = _BatchStream(plan, _latent_decoder, _collate_latents, batch_size=batch_size,
                           shuffle_buffer=shuffle_buffer, drop_last=True)
    return SampleStream(dataset, num_workers)


def training_stream(data_cfg: DataConfig, shards: str, *, seed: int, rank: int, world_size: int,
                    resume_step: int) -> SampleStream:
    """The training loop's stream: precomputed latents when `data.latent_shards` is set, else
    images from `shards` (space-separated URLs or one brace pattern), seeded by
    (seed, rank, resume_step) (pitfall 7). The loop opens a new one at every phase start and
    after every checkpoint, so an interrupted and resumed run reads exactly the batches an
    uninterrupted one reads."""
    common = dict(batch_size=data_cfg.batch_size, seed=seed, rank=rank, world_size=world_size,
                  resume_step=resume_step, shuffle_buffer=data_cfg.shuffle_buffer,
                  num_workers=data_cfg.num_workers)
    if data_cfg.latent_shards:
        return latent_loader(data_cfg.latent_shards, **common)
    urls = shards.split(" ") if " " in shards else shards
    return image_loader(urls, resolution=data_cfg.resolution, center_crop=data_cfg.center_crop, **common)


def write_latent_shards(batches: Iterable[LatentBatch], out_dir: str | Path, *,
                        samples_per_shard: int, prefix: str = "latents",
                        embed_dtype: np.dtype = np.float32) -> list[Path]:
    """Write LatentBatches as `{prefix}-NNNNNN.tar` shards; returns the shard paths written.

    Latents and time_ids stay float32; prompt/pooled embeddings are stored as `embed_dtype`
    (float16 halves the size; they are fp16-safe, unlike VAE activations).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    # ShardWriter opens its first file before any write: drop it if nothing was written.
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=samples_per_shard,
                         verbose=0) as sink:
        first = Path(sink.fname)
        for batch in batches:
            for i, key in enumerate(batch.keys):
                sink.write({
                    "__key__": key,
                    "latents.npy": _npy_bytes(batch.latents[i].float().cpu().numpy()),
                    "prompt_embeds.npy": _npy_bytes(
                        batch.cond.prompt_embeds[i].float().cpu().numpy().astype(embed_dtype)),
                    "pooled.npy": _npy_bytes(
                        batch.cond.pooled_embeds[i].float().cpu().numpy().astype(embed_dtype)),
                    "time_ids.npy": _npy_bytes(batch.cond.time_ids[i].float().cpu().numpy()),
                    "txt": batch.captions[i],
                })
                if not written or written[-1] != Path(sink.fname):
                    written.append(Path(sink.fname))
    if not written:
        first.unlink(missing_ok=True)
    return written
