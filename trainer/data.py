"""The input pipeline: tf.data straight from the HDF5 shards, through the reading API.

`tf_dataset(path, batch_size, ...)` is the one entry: train, evaluate and anyone else's Keras
or TensorFlow code read through it (`train_dataset` and `eval_dataset` are its trainer-config
shorthands).

Contract:
- A sample is `({"bg": (H,W,3) uint8, "fg_bg": (H,W,3) uint8}, {"mask": (H,W,1) uint8 in {0,1},
  "depth": (H,W,1) float16 in [0,1]})`; `depth` only when the dataset has it. `bg` is the
  sample's own background (`meta["bg"]` indexes `ds.backgrounds`, held in memory once).
- Validation is held out by background: `split_backgrounds` picks the held-out ids from the
  seed alone, so a run and its resume (and `evaluate --split val`) agree.
- The training stream is endless and a pure function of (seed, position): pass p visits the
  shards in the order drawn from (seed, p), `shuffle_shards` shards at a time, and shuffles the
  samples of those shards together with (seed, p, group). Epoch e is the slice of the stream
  starting at e x steps x batch, so a resumed run sees exactly the batches it would have seen.
  Augmentations draw from stateless RNGs seeded by (seed, position): also resumable.
- Reading whole shards (`ds.read_shard`) happens in a Python generator (cheap: no decoding);
  JPEG decoding, mask unpacking and augmentation run in parallel tf.data maps, then batches are
  prefetched.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from pipeline import codec
from pipeline.dataset import Dataset, open_dataset
from pipeline.errors import DatasetError
from pipeline.splits import split_backgrounds

from .config import AugmentConfig, TrainConfig
from .model import Normalisation

log = logging.getLogger(__name__)
STATS = "stats.json"


@dataclass(frozen=True)
class Split:
    """Which backgrounds train and which validate, and how many samples each side has."""

    train_bgs: tuple[int, ...]
    val_bgs: tuple[int, ...]
    n_train: int
    n_val: int


def samples_per_background(ds: Dataset) -> NDArray[np.int64]:
    """(num_bg,) sample counts. Overlay makes every background appear equally often (its
    geometry says how often); any other dataset is counted from the shards' meta."""
    num_bg = len(ds.backgrounds)
    geo = ds.manifest.get("stages", {}).get("overlay", {}).get("geometry") or {}
    try:
        per_bg = int(geo["num_fg"]) * int(geo["mirrors"]) * int(geo["positions"])
        if int(geo["num_bg"]) == num_bg and per_bg * num_bg == len(ds):
            return np.full(num_bg, per_bg, np.int64)
    except (KeyError, TypeError, ValueError):
        pass
    counts = np.zeros(num_bg, np.int64)
    for k in range(len(ds.shards)):
        counts += np.bincount(ds.read_shard(k).meta["bg"], minlength=num_bg)
    return counts


def make_split(ds: Dataset, cfg: TrainConfig) -> Split:
    counts = samples_per_background(ds)
    train, val = split_backgrounds(len(counts), cfg.validation.backgrounds, cfg.seed)
    return Split(tuple(train), tuple(val), int(counts[train].sum()), int(counts[val].sum()))


def load_normalisation(ds: Dataset, with_depth: bool) -> Normalisation:
    """The model's input (and depth) normalisation from DATASET/stats.json, refusing one that is
    missing or older than the shards."""
    path = ds.root / STATS
    hint = f"run `cli.py stats {ds.root}`"
    if not path.is_file():
        raise DatasetError(f"no {STATS} in {ds.root}: the trainer normalises with it; {hint}")
    try:
        stats = json.loads(path.read_text())
        shas = [s["sha256"] for s in ds.shards]
        if stats.get("shards_sha256") != shas:
            raise DatasetError(
                f"{path} is out of date (the shards changed since it was written, e.g. depth "
                f"was added); {hint} again"
            )
        if with_depth and not stats.get("depth"):
            raise DatasetError(f"{path} has no depth statistics; {hint} again")
        d = stats.get("depth") if with_depth else None
        return Normalisation(
            fg_bg_mean=tuple(stats["fg_bg"]["mean"]),
            fg_bg_std=tuple(stats["fg_bg"]["std"]),
            bg_mean=tuple(stats["bg"]["mean"]),
            bg_std=tuple(stats["bg"]["std"]),
            depth_mean=float(d["mean"]) if d else 0.0,
            depth_std=float(d["std"]) if d else 1.0,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"damaged {path} ({e!r}); {hint} again") from None


def resolve_pos_weight(setting: float | str | None, dataset_root: Path) -> float:
    """The weight of car pixels in the mask BCE for a config's `loss.mask_pos_weight`: "stats"
    reads it from DATASET_ROOT/stats.json (1.0 where that has none), a number is itself, None
    is 1.0. The one rule for training and evaluate: evaluate passes the run's training dataset."""
    if setting != "stats":
        return float(setting or 1.0)
    path = dataset_root / STATS
    try:
        pw = json.loads(path.read_text())["mask"]["pos_weight"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f"'loss.mask_pos_weight' is \"stats\", and {path} cannot be read ({e}); "
            f"run `cli.py stats {dataset_root}`"
        ) from None
    return float(pw) if pw else 1.0


# ------------------------------------------------------------------------ Python block reader

Block = tuple[Any, ...]


class ShardBlocks:
    """Blocks of samples (encoded images, packed masks, bg ids, positions[, depth]) from the
    shards, restricted to the given backgrounds."""

    def __init__(
        self,
        ds: Dataset,
        bg_ids: tuple[int, ...] | None,
        with_depth: bool,
        seed: int = 0,
        shuffle: bool = False,
        shuffle_shards: int = 4,
    ) -> None:
        self.ds = ds
        self.keep: NDArray[np.bool_] | None = None
        if bg_ids is not None:
            self.keep = np.zeros(len(ds.backgrounds), bool)
            self.keep[list(bg_ids)] = True
        self.with_depth = with_depth
        self.seed = seed
        self.shuffle = shuffle
        self.group = shuffle_shards if shuffle else 1

    def _read_group(self, shards: list[int]) -> list[Any]:
        enc: list[Any] = []
        masks, bgs, depth = [], [], []
        for k in shards:
            b = self.ds.read_shard(k)
            if b.depth is None and self.with_depth:
                raise DatasetError(f"shard {self.ds.shards[k]['file']} has no depth")
            keep = self.keep
            rows = np.arange(len(b)) if keep is None else np.flatnonzero(keep[b.meta["bg"]])
            enc += [b.encoded[i] for i in rows]
            masks.append(b.masks_packed[rows])
            bgs.append(b.meta["bg"][rows].astype(np.int32))
            if self.with_depth:
                depth.append(b.depth[rows])
        encoded = np.empty(len(enc), object)  # (not np.array: equal lengths would make 2-D)
        for i, e in enumerate(enc):
            encoded[i] = e
        out = [encoded, np.concatenate(masks), np.concatenate(bgs)]
        if self.with_depth:
            out.append(np.concatenate(depth))
        return out

    def one_pass(self, p: int) -> Iterator[list[Any]]:
        n = len(self.ds.shards)
        order = np.random.default_rng([self.seed, p]).permutation(n) if self.shuffle else range(n)
        order = list(order)
        for g, start in enumerate(range(0, n, self.group)):
            arrays = self._read_group([int(k) for k in order[start : start + self.group]])
            if self.shuffle:
                perm = np.random.default_rng([self.seed, p, g]).permutation(len(arrays[0]))
                arrays = [a[perm] for a in arrays]
            if len(arrays[0]):
                yield arrays

    def stream(self, start: int = 0, per_pass: int | None = None) -> Iterator[Block]:
        """Endless blocks from stream position `start`; each block carries its positions."""
        p, skip = (start // per_pass, start % per_pass) if per_pass else (0, 0)
        pos = start
        while True:
            for arrays in self.one_pass(p):
                if skip >= len(arrays[0]):
                    skip -= len(arrays[0])
                    continue
                arrays = [a[skip:] for a in arrays]
                skip = 0
                n = len(arrays[0])
                yield (*arrays[:3], np.arange(pos, pos + n, dtype=np.int64), *arrays[3:])
                pos += n
            p += 1

    def single_pass(self, limit: int | None = None) -> Iterator[Block]:
        pos = 0
        for arrays in self.one_pass(0):
            if limit is not None:
                arrays = [a[: limit - pos] for a in arrays]
            n = len(arrays[0])
            if n == 0:
                return
            yield (*arrays[:3], np.arange(pos, pos + n, dtype=np.int64), *arrays[3:])
            pos += n


# --------------------------------------------------------------------------- batch assembly


class BatchMaker:
    """Numpy batches from blocks: JPEG/PNG decoding in a thread pool (simplejpeg releases the
    GIL). Only the decoded composites, the bit-packed masks and the background ids cross into
    TensorFlow (each byte copied from Python costs); backgrounds are gathered and masks unpacked
    on the TensorFlow side. Measured faster here than decoding in per-sample tf.data maps, whose
    per-element overhead cost more than the decoding itself (bench/trainer_results.md)."""

    def __init__(
        self,
        ds: Dataset,
        with_depth: bool,
        hflip: float = 0.0,
        seed: int = 0,
        threads: int | None = None,
        image_size: tuple[int, int] | None = None,
        resize_targets: bool = True,
    ) -> None:
        self.src = tuple(int(v) for v in ds.manifest["image_size"])
        self.size = tuple(image_size) if image_size else self.src
        # Composites are resized as they are decoded (cv2 INTER_AREA, in the worker threads);
        # masks by area then threshold at one half (no half-pixel shift, unlike nearest).
        self.resize = self.size != self.src
        self.resize_targets = resize_targets and self.resize
        self.height, self.width = self.size
        self.target = self.size if self.resize_targets else self.src
        self.num_bg = len(ds.backgrounds)
        self.with_depth = with_depth
        self.hflip = hflip
        self.seed = seed
        self.threads = threads or min(4, os.cpu_count() or 1)

    def batches(
        self, blocks: Iterator[Block], batch_size: int, drop_remainder: bool
    ) -> Iterator[tuple[Any, ...]]:
        # Daemon threads (multiprocessing's ThreadPool): an endless generator that is never
        # closed must not keep the interpreter from exiting.
        pool = ThreadPool(self.threads) if self.threads > 1 else None
        try:
            for chunk in _rebatch(blocks, batch_size, drop_remainder):
                yield self._decode(chunk, pool)
        finally:
            if pool is not None:
                pool.terminate()

    def _decode(self, chunk: Block, pool: ThreadPool | None) -> tuple[Any, ...]:
        enc, pos = chunk[0], chunk[3]
        n = len(enc)
        fg_bg = np.empty((n, self.height, self.width, 3), np.uint8)
        flip = np.zeros(n, bool)
        if self.hflip > 0:
            draw = np.random.default_rng([self.seed, 0xF11B, int(pos[0])]).random(n)
            flip = draw < self.hflip

        def decode(i: int) -> None:
            if not self.resize and not flip[i]:
                codec.decode_into(enc[i], fg_bg[i])
                return
            img = codec.decode(enc[i])
            if self.resize:
                img = cv2.resize(img, (self.width, self.height), interpolation=cv2.INTER_AREA)
            if flip[i]:  # cv2.flip in the worker thread: fast, and it releases the GIL
                cv2.flip(img, 1, dst=fg_bg[i])
            else:
                fg_bg[i] = img

        if pool is None:
            for i in range(n):
                decode(i)
        else:
            pool.map(decode, range(n), chunksize=max(1, -(-n // self.threads)))
        out = [fg_bg, *chunk[1:]]
        if self.resize_targets:
            out = self._resize_targets(out)
        if flip.any():
            out = self._flip_rest(out, np.flatnonzero(flip))
        return tuple(out)

    def _resize_targets(self, out: list[Any]) -> list[Any]:
        h, w = self.target
        masks = np.unpackbits(out[1], axis=-1, count=self.src[1]) * np.uint8(255)
        small = [cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA) >= 128 for m in masks]
        out[1] = np.packbits(np.stack(small), axis=-1) if small else out[1][:, :h, : (w + 7) // 8]
        if self.with_depth:
            d = [
                cv2.resize(x.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                for x in out[4]
            ]
            out[4] = np.stack(d).astype(np.float16) if d else out[4][:, :h, :w]
        return out

    def _flip_rest(self, out: list[Any], flip: NDArray[np.intp]) -> list[Any]:
        """Mirror the masks and depth of the flipped samples (their composites were mirrored
        as they were decoded); the background by pointing at its mirrored copy (id + num_bg)
        in the TensorFlow-side table, which costs nothing per sample."""
        packed, bg_ids = out[1:3]
        bits = np.unpackbits(packed[flip], axis=-1, count=self.target[1])[..., ::-1]
        packed = packed.copy()
        packed[flip] = np.packbits(bits, axis=-1)
        bg_ids = bg_ids.copy()
        bg_ids[flip] += self.num_bg
        out[1:3] = [packed, bg_ids]
        if self.with_depth:
            depth = out[4].copy()
            depth[flip] = depth[flip, :, ::-1]
            out[4] = depth
        return out


def _rebatch(blocks: Iterator[Block], size: int, drop_remainder: bool) -> Iterator[Block]:
    """Blocks of any length to chunks of exactly `size` (the last one shorter unless dropped)."""
    carry: Block | None = None
    for block in blocks:
        if carry is not None:
            block = tuple(np.concatenate([a, b]) for a, b in zip(carry, block, strict=True))
            carry = None
        n = len(block[0])
        full = n - n % size
        for s in range(0, full, size):
            yield tuple(a[s : s + size] for a in block)
        if full < n:
            carry = tuple(a[full:] for a in block)
    if carry is not None and not drop_remainder:
        yield carry


# ------------------------------------------------------------------------------- tf.data side


def _signature(tf: Any, maker: BatchMaker) -> tuple[Any, ...]:
    (h, w), (th, tw) = maker.size, maker.target
    sig = (
        tf.TensorSpec((None, h, w, 3), tf.uint8),
        tf.TensorSpec((None, th, (tw + 7) // 8), tf.uint8),
        tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((None,), tf.int64),
    )
    if maker.with_depth:
        sig += (tf.TensorSpec((None, th, tw), tf.float16),)
    return sig


def _augment(tf: Any, aug: AugmentConfig, seed: int, pos: Any, x: dict, y: dict) -> tuple:
    """Colour changes of fg_bg, per sample, vectorised over the batch, drawn from stateless RNGs
    seeded by (seed, the batch's first stream position): a resumed run repeats them. (The flip
    is done while batching, in numpy: on uint8 batches it is far cheaper there.)"""
    n = tf.shape(x["fg_bg"])[0]
    seeds = tf.random.experimental.stateless_split(tf.stack([tf.cast(seed, tf.int64), pos[0]]), 7)

    def draw(i: int, lo: float, hi: float) -> Any:
        return tf.random.stateless_uniform((n, 1, 1, 1), seeds[i], lo, hi)

    if aug.colour:
        img = tf.cast(x["fg_bg"], tf.float32) / 255.0
        if aug.brightness:
            img += draw(1, -aug.brightness, aug.brightness)
        if aug.contrast:
            mean = tf.reduce_mean(img, axis=[1, 2, 3], keepdims=True)
            img = (img - mean) * draw(2, 1 - aug.contrast, 1 + aug.contrast) + mean
        if aug.saturation:
            grey = tf.reduce_mean(img, axis=-1, keepdims=True)
            img = (img - grey) * draw(3, 1 - aug.saturation, 1 + aug.saturation) + grey
        if aug.hue:
            img = _rotate_hue(tf, img, draw(4, -aug.hue, aug.hue) * (2 * np.pi))
        if aug.noise:
            img += tf.random.stateless_normal(tf.shape(img), seeds[5], stddev=aug.noise)
        x = {**x, "fg_bg": tf.cast(tf.round(tf.clip_by_value(img, 0, 1) * 255), tf.uint8)}
    return x, y


_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(tf: Any, img: Any, angle: Any) -> Any:
    """Hue shift as a rotation of the chroma plane in YIQ: linear, so cheap on a batch."""
    yiq = tf.einsum("bhwc,dc->bhwd", img, tf.constant(_RGB2YIQ, tf.float32))
    c, s = tf.cos(angle[..., 0]), tf.sin(angle[..., 0])
    i = yiq[..., 1:2] * c - yiq[..., 2:3] * s
    q = yiq[..., 1:2] * s + yiq[..., 2:3] * c
    back = tf.constant(np.linalg.inv(_RGB2YIQ), tf.float32)
    return tf.einsum("bhwc,dc->bhwd", tf.concat([yiq[..., :1], i, q], -1), back)


def make_tf_dataset(
    maker: BatchMaker,
    batches: Any,
    ds: Dataset,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    augmenter: Any = None,
) -> Any:
    """(inputs, targets) batches from a callable returning an iterator of `maker`'s batches;
    `augmenter` (trainer.augment.Augmenter): the named albumentations transforms."""
    import tensorflow as tf

    th, tw = maker.target
    table = ds.backgrounds
    if maker.resize:
        table = np.stack(
            [cv2.resize(b, maker.size[::-1], interpolation=cv2.INTER_AREA) for b in table]
        )
    if maker.hflip > 0:
        table = np.concatenate([table, table[:, :, ::-1]])  # ids >= num_bg: mirrored
    backgrounds = tf.constant(table)
    shifts = tf.constant([7, 6, 5, 4, 3, 2, 1, 0], tf.uint8)

    def structure(fg_bg: Any, packed: Any, bg_ids: Any, pos: Any, *depth: Any) -> tuple:
        bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(packed[..., None], shifts), 1)
        mask = tf.reshape(bits, (-1, th, packed.shape[-1] * 8))[:, :, :tw, None]
        x = {"bg": tf.gather(backgrounds, bg_ids), "fg_bg": fg_bg}
        y = {"mask": mask}
        if maker.with_depth:
            y["depth"] = depth[0][..., None]
        if augmenter is not None:  # after the flip, before the colour jitter
            x, y = augmenter.tf_apply(tf, pos, x, y)
        if augment is not None and augment.colour:
            x, y = _augment(tf, augment, seed, pos, x, y)
        return x, y

    options = tf.data.Options()
    options.deterministic = True
    return (
        tf.data.Dataset.from_generator(batches, output_signature=_signature(tf, maker))
        .map(structure, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )


SPLITS = ("train", "val", "all")


def tf_dataset(
    path: str | Path | Dataset,
    batch_size: int,
    *,
    split: str | Sequence[int] = "all",
    holdout: float = 0.1,
    seed: int = 0,
    with_depth: bool | None = None,
    shuffle: bool = False,
    shuffle_shards: int = 4,
    augment: AugmentConfig | None = None,
    image_size: tuple[int, int] | None = None,
    resize_targets: bool = True,
    repeat: bool = False,
    start: int = 0,
    max_samples: int | None = None,
    transformations: Sequence[dict[str, Any]] = (),
) -> Any:
    """The trainer's input pipeline as a `tf.data.Dataset` of `(inputs, targets)` batches:
        inputs  {"bg": (B, h, w, 3) uint8 RGB, "fg_bg": (B, h, w, 3) uint8 RGB}
        targets {"mask": (B, h', w', 1) uint8 in {0, 1}, "depth": (B, h', w', 1) float16 in
                 [0, 1] (only with depth)}
    (h, w) = image_size, or the dataset's size; (h', w') the same, or the dataset's size with
    resize_targets=False. Not normalised: the trainer's model normalises inside itself with
    stats.json (`load_normalisation`); another model can take `tf.cast(x, tf.float32) / 255`.

    path: a dataset folder or an open `Dataset`. split: "train" or "val" (backgrounds held out
    by `pipeline.splits.split_backgrounds(num_bg, holdout, seed)`: holdout < 1 a fraction, >= 1
    a count; the trainer's rule), "all", or the background ids to read. with_depth: None reads
    depth when the dataset has it. shuffle: shard order and samples, drawn from (seed, pass),
    `shuffle_shards` shards mixed at a time. augment: flips and colour jitter of fg_bg, drawn
    from (seed, stream position). transformations: albumentations transforms by name, as a
    config's `transformations.train` (trainer/augment.py), also drawn from (seed, stream
    position). repeat=False: one pass, the last batch may be shorter, and
    the dataset knows its number of batches (at most max_samples samples); repeat=True: the
    endless stream of full batches from stream position `start` (a multiple of batch_size), as
    training reads it: a resumed run sees the batches it would have seen.
    """
    import tensorflow as tf

    ds = path if isinstance(path, Dataset) else open_dataset(path)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
    if with_depth is None:
        with_depth = ds.has_depth
    elif with_depth and not ds.has_depth:
        raise DatasetError(f"{ds.root} has no depth; run `cli.py depth {ds.root}` first")
    counts = samples_per_background(ds)
    bg_ids = _backgrounds(split, len(counts), holdout, seed)
    n = int(counts.sum() if bg_ids is None else counts[list(bg_ids)].sum())
    reader = ShardBlocks(ds, bg_ids, with_depth, seed, shuffle, shuffle_shards)
    hflip = augment.hflip if augment is not None else 0.0
    maker = BatchMaker(
        ds, with_depth, hflip, seed, image_size=image_size, resize_targets=resize_targets
    )
    if repeat and n == 0:
        raise DatasetError(f"{ds.root}: no samples in split {split!r} to repeat")
    if repeat and max_samples is not None:
        raise ValueError("max_samples limits one pass; it does not go with repeat=True")
    if max_samples is not None:
        n = min(n, max_samples)

    def blocks() -> Iterator[Block]:
        return reader.stream(start, n) if repeat else reader.single_pass(max_samples)

    augmenter = None
    if transformations:
        from .augment import Augmenter

        augmenter = Augmenter(transformations, seed, maker.size, with_depth)
        if augmenter.dual and maker.target != maker.size:
            raise ValueError("transforms that move pixels need resize_targets=True")
    out = make_tf_dataset(
        maker, lambda: maker.batches(blocks(), batch_size, repeat), ds, augment, seed, augmenter
    )
    if not repeat:
        out = out.apply(tf.data.experimental.assert_cardinality(-(-n // batch_size)))
    return out


def _backgrounds(
    split: str | Sequence[int], num_bg: int, holdout: float, seed: int
) -> tuple[int, ...] | None:
    """The background ids a split reads (None: all)."""
    if isinstance(split, str):
        if split not in SPLITS:
            raise ValueError(
                f"split must be one of {', '.join(SPLITS)} or background ids, got {split!r}"
            )
        if split == "all":
            return None
        train, val = split_backgrounds(num_bg, holdout, seed)
        return tuple(train if split == "train" else val)
    ids = tuple(int(b) for b in split)
    bad = [b for b in ids if not 0 <= b < num_bg]
    if bad:
        raise ValueError(f"background ids {bad} out of range 0..{num_bg - 1}")
    return ids


def train_dataset(
    ds: Dataset, cfg: TrainConfig, split: Split, with_depth: bool, start: int = 0
) -> Any:
    """`tf_dataset`'s training stream for a config and split (from stream position `start`)."""
    return tf_dataset(
        ds,
        cfg.batch_size,
        split=split.train_bgs,
        seed=cfg.seed,
        with_depth=with_depth,
        shuffle=cfg.shuffle,
        shuffle_shards=cfg.shuffle_shards,
        augment=cfg.augment,
        image_size=cfg.image_size,
        repeat=True,
        start=start,
        transformations=cfg.transformations.train,
    )


def eval_dataset(
    ds: Dataset,
    bg_ids: tuple[int, ...] | None,
    with_depth: bool,
    batch_size: int,
    image_size: tuple[int, int] | None,
    max_samples: int | None = None,
    resize_targets: bool = True,
) -> Any:
    """`tf_dataset`'s one deterministic pass over the samples of the given backgrounds (None:
    all)."""
    return tf_dataset(
        ds,
        batch_size,
        split="all" if bg_ids is None else bg_ids,
        with_depth=with_depth,
        image_size=image_size,
        resize_targets=resize_targets,
        max_samples=max_samples,
    )
