"""Named albumentations transforms (`transformations.train` / `.val` of the training config).

Input: a config's transformations, a tuple of JSON objects {"name": "Blur", "p": 0.2, its
parameters..., optionally "targets": ["fg_bg", "bg"]}; samples of the input pipeline (bg and
fg_bg (H, W, 3) uint8, mask (H, W) uint8 in {0, 1}, depth (H, W) float in [0, 1] or None).
Output: the same arrays, augmented.

Contract:
- `canonical_config(raw, source)` checks every entry when the config loads (an unknown name, an
  unknown or invalid parameter: one ConfigError naming the entry) and brings it to
  albumentations 2's form, with a logged note for each change: `Cutout` (and CoarseDropout's
  1.x parameters) become CoarseDropout's ranges, `always_apply: true` becomes `p: 1`, `Normalize`
  (and ToTensor) entries are dropped (the model normalises with stats.json inside itself), and
  `Resize` sets `image_size` (the pipeline then resizes every image, mask and depth map as it
  decodes them). The result is what a run records, and it loads again with no notes.
- Pixel transforms (albumentations' ImageOnlyTransform) change fg_bg, or the images their
  "targets" name; dual transforms (DualTransform: flips, affine warps, crops, dropouts) change
  bg, fg_bg, mask and depth alike with one draw of their parameters, mask and depth as masks
  (never interpolated like images; depth as a float32 mask).
- Deterministic: sample at stream position `pos` draws from a generator seeded by (seed, pos),
  whatever thread runs it and however the stream was cut by a resume.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

TAG = 0xA1B  # the per-sample seeds' stream tag: (seed, TAG, position)
DROPPED = {
    "Normalize": "the model normalises its inputs with DATASET/stats.json inside itself",
    "ToTensor": "the pipeline hands TensorFlow its own tensors",
    "ToTensorV2": "the pipeline hands TensorFlow its own tensors",
}
# Abstract bases and 3-D (volume) transforms: not usable by name on 2-D samples.
NOT_BY_NAME = {"BasicTransform", "DualTransform", "ImageOnlyTransform", "NoOp", "Transform3D"}


def albumentations() -> Any:
    """The albumentations module, imported on first use without its PyPI update check (a
    network call at import)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    return A


# ------------------------------------------------------------------------- names, parameters


def transform_class(name: str, where: str) -> type:
    A = albumentations()
    cls = getattr(A, name, None)
    ok = (
        isinstance(cls, type)
        and issubclass(cls, (A.ImageOnlyTransform, A.DualTransform))
        and not issubclass(cls, A.Transform3D)
        and name not in NOT_BY_NAME
    )
    if not ok:
        what = "a composition, not a transform" if isinstance(cls, type) else "unknown"
        raise ConfigError(
            f"{where}: {name!r} is {what} (give an albumentations {A.__version__} transform "
            "by its class name, e.g. Blur, GaussNoise, CoarseDropout, HorizontalFlip, Affine)"
        )
    return cls


def is_dual(cls: type) -> bool:
    """Whether a transform moves pixels (applied to bg, fg_bg, mask and depth alike)."""
    return issubclass(cls, albumentations().DualTransform)


def parameters(cls: type) -> list[str]:
    sig = inspect.signature(cls.__init__).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in sig if p.name != "self" and p.kind in named]


def _first_error(e: Exception) -> str:
    """The first of pydantic's validation errors (albumentations re-raises them as ValueError
    text: a count line, then a location line and an indented message per error) as
    'location: message'; other errors' first line."""
    lines = str(e).splitlines()
    if len(lines) >= 3 and "validation error" in lines[0]:
        loc = lines[1].strip().split(".")[0]
        return f"{loc}: {lines[2].strip().split(' [type=')[0]}"
    return lines[0] if lines else type(e).__name__


def make_transform(
    entry: dict[str, Any], where: str, p: float | None = None, notes: list[str] | None = None
) -> Any:
    """The albumentations transform of a canonical entry (p replaced where given); ConfigError
    for an unknown name or parameter or an invalid value. albumentations' own warnings (a range
    it adjusted, a deprecation) go to `notes` where given, else nowhere (noted at load)."""
    name = entry["name"]
    cls = transform_class(name, where)
    params = {k: v for k, v in entry.items() if k not in ("name", "targets")}
    if p is not None:
        params["p"] = p
    allowed = parameters(cls)
    for k in params:
        if k not in allowed:
            raise ConfigError(
                f"{where}: {name} has no parameter {k!r} (its parameters: {', '.join(allowed)})"
            )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t = cls(**params)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {name}: {_first_error(e)}") from None
    if notes is not None:
        notes += [f"{where}: {name}: {w.message}" for w in caught]
    return t


def check_entry(entry: dict[str, Any], where: str) -> list[str]:
    """ConfigError for a bad canonical entry; albumentations' warnings about it as notes."""
    name = entry["name"]
    if entry.get("targets") is not None and is_dual(transform_class(name, where)):
        raise ConfigError(
            f"{where}: {name} moves pixels, so it applies to bg, fg_bg, mask and depth alike; "
            "'targets' is for pixel transforms only (remove it)"
        )
    notes: list[str] = []
    make_transform(entry, where, notes=notes)
    return notes


# --------------------------------------------------------------------- the original's names


def _dropout_ranges(name: str, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Cutout's (albumentations < 1.4) and CoarseDropout's 1.x parameters as CoarseDropout's
    ranges. Cutout's holes were max_h_size x max_w_size exactly; so are these."""
    old = {
        "Cutout": {"num_holes": 8, "max_h_size": 8, "max_w_size": 8},
        "CoarseDropout": {"max_holes": 8, "max_height": 8, "max_width": 8},
    }[name]
    old_only = {*old, "min_holes", "min_height", "min_width", "fill_value", "mask_fill_value"}
    if name == "CoarseDropout" and not set(params) & old_only:
        return params, []
    out = {k: v for k, v in params.items()}
    moved = []

    def take(key: str) -> Any:
        if key in out:
            moved.append(key)
        return out.pop(key, old.get(key))

    if name == "Cutout":
        n, h, w = take("num_holes"), take("max_h_size"), take("max_w_size")
        out["num_holes_range"], out["hole_height_range"] = [n, n], [h, h]
        out["hole_width_range"] = [w, w]
    else:
        hi_n, hi_h, hi_w = take("max_holes"), take("max_height"), take("max_width")
        lo_n, lo_h, lo_w = take("min_holes"), take("min_height"), take("min_width")
        out["num_holes_range"] = [lo_n if lo_n is not None else hi_n, hi_n]
        out["hole_height_range"] = [lo_h if lo_h is not None else hi_h, hi_h]
        out["hole_width_range"] = [lo_w if lo_w is not None else hi_w, hi_w]
    if "fill_value" in out:
        moved.append("fill_value")
        out["fill"] = out.pop("fill_value")
    if "mask_fill_value" in out:
        moved.append("mask_fill_value")
        out["fill_mask"] = out.pop("mask_fill_value")
    ranges = ("num_holes_range", "hole_height_range", "hole_width_range")
    new = ", ".join(f"{k}={out[k]}" for k in ranges)
    was = f"{name}({', '.join(moved)})" if moved else name
    return out, [f"{was} -> CoarseDropout({new}) (albumentations 2's name and parameters)"]


def _noise_std(params: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """GaussNoise's 1.x `var_limit` (a variance in 0-255 pixel units, a number v meaning
    [0, v]) and `mean` (pixels) as 2.x's `std_range` and `mean_range` (fractions of 255)."""
    out = dict(params)
    moved = [k for k in ("var_limit", "mean") if k in out]
    if "var_limit" in out:
        v = out.pop("var_limit")
        lo, hi = (0, v) if isinstance(v, int | float) else (v if isinstance(v, list) else [])
        if not all(isinstance(x, int | float) and x >= 0 for x in (lo, hi)):
            raise ConfigError(f"{where}: GaussNoise: 'var_limit' must be a variance or two")
        out["std_range"] = [round(float(lo) ** 0.5 / 255, 5), round(float(hi) ** 0.5 / 255, 5)]
    if "mean" in out:
        m = out.pop("mean")
        if not isinstance(m, int | float):
            raise ConfigError(f"{where}: GaussNoise: 'mean' must be a number (pixels)")
        out["mean_range"] = [round(m / 255, 5)] * 2
    new = ", ".join(f"{k}={out[k]}" for k in ("std_range", "mean_range") if k in out)
    note = f"GaussNoise({', '.join(moved)}) -> GaussNoise({new}) (albumentations 2's parameters)"
    return out, [note]


def canonical_entry(
    entry: dict[str, Any], where: str
) -> tuple[dict[str, Any] | None, list[str], tuple[int, int] | None]:
    """(the entry in albumentations 2's form or None where it is dropped, notes, the (height,
    width) of a Resize)."""
    name = entry["name"]
    params = {k: v for k, v in entry.items() if k != "name"}
    notes: list[str] = []
    if "always_apply" in params:
        always = params.pop("always_apply")
        if always is True:
            was = params.get("p")
            params["p"] = 1
            if was is None:
                notes.append("always_apply true -> p 1 (albumentations 2 has no always_apply)")
            elif was != 1:
                notes.append(f"always_apply true -> p 1 (was {was}; albumentations 2 has none)")
            else:
                notes.append("always_apply dropped: p is 1 (albumentations 2 has no always_apply)")
        elif always is not False:
            raise ConfigError(f"{where}: {name}: 'always_apply' must be true or false")
    if name in DROPPED:
        return None, [f"{name} ignored: {DROPPED[name]}"], None
    if name == "Resize":
        return None, notes, _resize(params, where)
    if name in ("Cutout", "CoarseDropout"):
        params, more = _dropout_ranges(name, params)
        notes += more
        name = "CoarseDropout"
    if name == "GaussNoise" and ("var_limit" in params or "mean" in params):
        params, more = _noise_std(params, where)
        notes += more
    out = {"name": name, **params}
    notes += check_entry(out, where)
    return out, notes, None


def _resize(params: dict[str, Any], where: str) -> tuple[int, int]:
    h, w = params.get("height"), params.get("width")
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise ConfigError(f"{where}: Resize needs whole 'height' and 'width', got {h} x {w}")
    if params.get("p", 1) != 1:
        raise ConfigError(
            f"{where}: Resize with p {params['p']}: the trainer trains at one size ('image_size'),"
            " so a Resize applies always (p 1)"
        )
    extra = sorted(set(params) - {"height", "width", "p"})
    if extra:
        raise ConfigError(
            f"{where}: Resize sets 'image_size' (images by area, masks by area then a threshold "
            f"at one half); its {', '.join(extra)} do not apply (remove them)"
        )
    return h, w


def canonical_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`raw` with its transformations checked and in albumentations 2's form, and the size of a
    Resize as `image_size` (see the module docstring); notes are logged. A schema-valid raw
    config in, a raw config out (the caller validates it again)."""
    from .config import ModelConfig, divisor

    t = raw.get("transformations") or {}
    out: dict[str, list[dict[str, Any]]] = {}
    size: tuple[int, int] | None = None
    size_where = ""
    for part in ("train", "val"):
        out[part] = []
        for i, entry in enumerate(t.get(part, ())):
            where = f"transformations.{part}[{i}]"
            try:
                new, notes, resize = canonical_entry(entry, where)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
            for n in notes:
                log.warning("%s: %s", source, n if n.startswith(where) else f"{where}: {n}")
            if new is not None:
                out[part].append(new)
            if resize is None:
                continue
            if size is not None and resize != size:
                raise ConfigError(
                    f"{source}: {where}: Resize to {resize[0]}x{resize[1]} differs from "
                    f"{size_where}'s {size[0]}x{size[1]}: the trainer trains and validates at "
                    "one size ('image_size')"
                )
            if size is None:
                size, size_where = resize, where
    if size is None:
        return {**raw, "transformations": out} if out != t else raw
    given = raw.get("image_size")
    if given is not None and tuple(given) != size:
        raise ConfigError(
            f"{source}: {size_where}: Resize to {size[0]}x{size[1]} conflicts with 'image_size' "
            f"{list(given)}; keep one of them"
        )
    k = divisor(ModelConfig(**(raw.get("model") or {})))
    if size[0] % k or size[1] % k:
        raise ConfigError(
            f"{source}: {size_where}: Resize to {size[0]}x{size[1]}: the model takes sides that "
            f"are multiples of {k}"
        )
    log.warning(
        "%s: %s: Resize -> 'image_size' [%d, %d] (every image, mask and depth map is resized as "
        "it is decoded, for training and validation)",
        source,
        size_where,
        *size,
    )
    return {**raw, "transformations": out, "image_size": list(size)}


# -------------------------------------------------------------------------------- applying


@dataclass(frozen=True)
class Step:
    """A run of consecutive entries that go to the same arrays: dual (bg, fg_bg, mask, depth)
    or pixel (the named images)."""

    dual: bool
    images: tuple[str, ...]  # of "fg_bg", "bg"
    entries: tuple[dict[str, Any], ...]


def plan_steps(entries: Sequence[dict[str, Any]], where: str) -> list[Step]:
    steps: list[Step] = []
    for i, e in enumerate(entries):
        dual = is_dual(transform_class(e["name"], f"{where}[{i}]"))
        images = ("fg_bg", "bg") if dual else tuple(e.get("targets") or ("fg_bg",))
        if steps and steps[-1].dual == dual and steps[-1].images == images:
            steps[-1] = Step(dual, images, (*steps[-1].entries, e))
        else:
            steps.append(Step(dual, images, (e,)))
    return steps


def _compose(step: Step, with_depth: bool, where: str, p: float | None = None) -> Any:
    A = albumentations()
    ts = [make_transform(e, where, p) for e in step.entries]
    if step.dual:
        extra = {"bg": "image", **({"depth": "mask"} if with_depth else {})}
    else:
        extra = {"bg": "image"} if step.images == ("fg_bg", "bg") else {}
    return A.Compose(ts, additional_targets=extra)


Arrays = tuple[Any, Any, Any, Any]  # fg_bg, bg, mask, depth; None where not augmented


def augment_sample(
    composes: Sequence[Any],
    steps: Sequence[Step],
    rng: np.random.Generator,
    fg_bg: NDArray[np.uint8],
    bg: NDArray[np.uint8] | None,
    mask: NDArray[np.uint8] | None,
    depth: NDArray[np.float32] | None,
) -> Arrays:
    """One sample through the steps (the pure function): fg_bg, bg (H, W, 3) uint8, mask (H, W)
    uint8 in {0, 1}, depth (H, W) float32 in [0, 1]; every draw from `rng`. bg may be None
    where no step touches it, mask where no step is dual, depth where there is none."""
    py = random.Random(int(rng.integers(2**63)))
    for c, s in zip(composes, steps, strict=True):
        c.set_random_state(rng, py)
        if s.dual:
            kw = {"image": fg_bg, "bg": bg, "mask": mask}
            if depth is not None:
                kw["depth"] = depth
            r = c(**kw)
            fg_bg, bg, mask, depth = r["image"], r["bg"], r["mask"], r.get("depth")
        elif s.images == ("bg",):
            bg = c(image=bg)["image"]
        elif s.images == ("fg_bg",):
            fg_bg = c(image=fg_bg)["image"]
        else:
            r = c(image=fg_bg, bg=bg)
            fg_bg, bg = r["image"], r["bg"]
    return fg_bg, bg, mask, depth


class Augmenter:
    """A config's transformations for samples of one (height, width): checked on a test sample
    when made, then applied per sample, seeded by (seed, stream position). Thread-safe: each
    call takes its own albumentations objects from a pool."""

    def __init__(
        self,
        entries: Sequence[dict[str, Any]],
        seed: int,
        size: tuple[int, int],
        with_depth: bool,
        where: str = "transformations",
    ) -> None:
        self.entries = tuple(entries)
        self.seed = int(seed)
        self.size = (int(size[0]), int(size[1]))
        self.with_depth = with_depth
        self.where = where
        self.steps = plan_steps(self.entries, where)
        self.dual = any(s.dual for s in self.steps)  # then mask and depth change too
        self.touches_bg = any("bg" in s.images for s in self.steps)
        self._pool: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._check()

    def _composes(self) -> list[Any]:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return [_compose(s, self.with_depth, self.where) for s in self.steps]

    def _check(self) -> None:
        """Each entry, forced on (p 1), on a test sample of this size: it must run and keep the
        sample's size (one size per batch)."""
        h, w = self.size
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), xx * 0 + 128], -1)
        img = img.astype(np.uint8)
        mask = (yy > h // 4) & (yy < 3 * h // 4) & (xx > w // 4) & (xx < 3 * w // 4)
        depth = (yy / max(1, h - 1)).astype(np.float32) if self.with_depth else None
        i = 0
        for s in self.steps:
            for e in s.entries:
                where = f"{self.where}[{i}] ({e['name']})"
                one = Step(s.dual, s.images, (e,))
                rng = np.random.default_rng(0)
                try:
                    c = _compose(one, self.with_depth, where, p=1.0)
                    out = augment_sample([c], [one], rng, img, img, mask.astype(np.uint8), depth)
                except ConfigError:
                    raise
                except Exception as err:  # a failure of the library on this entry
                    raise ConfigError(
                        f"{where} fails on a {h}x{w} sample: {_first_error(err)}"
                    ) from None
                shapes = {a.shape[:2] for a in out if a is not None}
                if shapes != {(h, w)}:
                    got = " and ".join(f"{a}x{b}" for a, b in sorted(shapes))
                    raise ConfigError(
                        f"{where} changes the sample's size ({h}x{w} -> {got}): a batch holds "
                        "one size; set the size with 'image_size' (or a Resize entry)"
                    )
                i += 1

    def rng(self, pos: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, TAG, int(pos)])

    def batch(
        self,
        pos: NDArray[np.int64],
        fg_bg: NDArray[np.uint8],
        bg: NDArray[np.uint8] | None = None,
        mask: NDArray[np.uint8] | None = None,
        depth: NDArray[Any] | None = None,
    ) -> Arrays:
        """A batch, (B, H, W, 3) images and (B, H, W) mask and depth, of the samples at stream
        positions `pos`, augmented into new arrays. Give bg where `touches_bg`, mask (and depth
        where the dataset has it) where `dual`; None comes back for the others. Depth keeps its
        dtype (transformed as float32)."""
        given = (fg_bg, bg, mask, depth)
        outs = [np.empty_like(a) if a is not None else None for a in given]
        composes = self._composes()
        try:
            for i, p in enumerate(pos):
                one = [a[i] if a is not None else None for a in given]
                if one[3] is not None:
                    one[3] = one[3].astype(np.float32)
                res = augment_sample(composes, self.steps, self.rng(p), *one)
                for o, r in zip(outs, res, strict=True):
                    if o is not None:
                        o[i] = r
        finally:
            self._pool.put(composes)
        return tuple(outs)  # type: ignore[return-value]

    def tf_apply(self, tf: Any, pos: Any, x: dict[str, Any], y: dict[str, Any]) -> tuple:
        """The batch step inside a tf.data map (`tf.numpy_function`): the pipeline's (x, y) in,
        augmented (x, y) out; only the arrays that change cross into numpy and back."""
        names = ["fg_bg"] + (["bg"] if self.touches_bg else [])
        if self.dual:
            names += ["mask"] + (["depth"] if "depth" in y else [])
        both = {**x, **y}
        args = [both[k] if k in x else both[k][..., 0] for k in names]
        types = [a.dtype for a in args]

        def run(pos: Any, *arrays: Any) -> list[Any]:
            given = dict(zip(names, arrays, strict=True))
            out = self.batch(pos, *(given.get(k) for k in ("fg_bg", "bg", "mask", "depth")))
            keys = ("fg_bg", "bg", "mask", "depth")
            return [o for k, o in zip(keys, out, strict=True) if k in given]

        res = tf.numpy_function(run, [pos, *args], types, stateful=False)
        x, y = dict(x), dict(y)
        for k, r in zip(names, res, strict=True):
            if k in x:
                x[k] = tf.ensure_shape(r, x[k].shape)
            else:
                y[k] = tf.ensure_shape(r[..., None], y[k].shape)
        return x, y
