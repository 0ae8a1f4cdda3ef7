"""Configs in the original trainer's layout (S15AB's config.json), translated to this trainer's.

Input: a parsed JSON object. `is_legacy(raw)` recognises the layout by keys that only it has
(never by the file's name): `model_initializer`, `transformations.train.which/what`, losses as
lists per output ({"mask": ["BCEWithLogitsLoss"]}), `optimizer.type`, `scheduler.type`,
`lr_step_size`/`lr_gamma`, `lr_finder.range_test`, `model_optimization.prunning`, a model given
as a string. Every one of them is invalid in this trainer's schema, so a config of this layout
is never taken for an old one.

Transform entries are kept for trainer/augment.py to bring to albumentations 2's form (Cutout,
always_apply, Normalize, Resize), with the one default that changed written out (GaussNoise's
var_limit, see `_pin_defaults`).

Output: `translate(raw, source)` returns a `Translation`: the config in this trainer's layout
(validated afterwards by `TrainConfig.from_dict`, like any config) and what had no equivalent,
logged as ONE warning line; nothing is dropped silently. Keys of this trainer's own layout found
in an old file (e.g. "augment") are kept as they are.

`loads_lenient(text)` reads JSON that has trailing commas (`{"p": 1,}`), as the original
trainer's published config.json does; any other fault stays an error.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRANSLATED = "translated_config.json"  # in the run folder: the config as this trainer reads it

MODELS = {
    "mobilenet_v2": "mobilenet_unet",
    "mobilenet": "mobilenet_unet",
    "u_net": "unet",
    "unet": "unet",
    "res_u_net": "resnet34_unet",
    "resunet": "resnet34_unet",
    "res_unet": "resnet34_unet",
}
MASK_LOSSES = {
    "BCEWithLogitsLoss": "bce",
    "BCELoss": "bce",
    # two-class cross-entropy over (background, car) logits is BCE over one logit
    "CrossEntropyLoss": "bce",
    "dice": "dice",
    "DiceLoss": "dice",
    "DiceCoeff": "dice",
}
DEPTH_LOSSES = {"MSELoss": "mse", "L1Loss": "l1", "SSIM": "ssim", "ssim": "ssim"}
OPTIMIZERS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}
OPTIMIZER_KEYS = {
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "nesterov": "nesterov",
    "eps": "epsilon",
}
SCHEDULERS = {"OneCycleLR": "one_cycle", "StepLR": "step", "ReduceLROnPlateau": "reduce_on_plateau"}
SCHEDULER_KEYS = {
    "one_cycle": {
        "max_lr": "max_lr",
        "pct_start": "pct_start",
        "div_factor": "div_factor",
        "final_div_factor": "final_div_factor",
    },
    "step": {"step_size": "step_epochs", "gamma": "gamma"},
    "reduce_on_plateau": {"factor": "factor", "patience": "patience", "min_lr": "min_lr"},
}
RANGE_TEST_KEYS = {
    "start_lr": "start_lr",
    "end_lr": "end_lr",
    "num_iter": "steps",
    "step_mode": "step_mode",
    "smooth_f": "smoothing",
    "diverge_th": "diverge",
}
# The original's pruning: 20% of the remaining weights, L1, global, at the start of each epoch.
ORIGINAL_PRUNING = {"amount": 0.2, "scope": "global", "every": "epoch"}
SAME = {"seed", "lr", "epochs", "batch_size", "shuffle", "lr_finder_use"}
# This trainer's own keys: kept where an old file has them.
OWN = {
    "steps_per_epoch",
    "shuffle_shards",
    "image_size",
    "validation",
    "loss_weights",
    "augment",
    "tensorboard_images",
    "best_metric",
    "jit_compile",
    "$schema",
}
WHY = {
    "data": "the dataset is the DATASET argument of `cli.py train`",
    "num_workers": "tf.data sizes its own parallel maps",
    "multiclass": "the model has one car mask and one depth map, no classes",
}


@dataclass
class Translation:
    config: dict[str, Any]  # this trainer's layout
    unmapped: dict[str, str] = field(default_factory=dict)  # key -> why it has no equivalent
    notes: list[str] = field(default_factory=list)  # translations worth a word

    def warning(self, source: str) -> str:
        items = "; ".join(f"{k}: {why}" for k, why in self.unmapped.items())
        return f"{source}: the original trainer's keys with no equivalent here, not used: {items}"


def is_legacy(raw: Any) -> bool:
    """Whether a parsed config is in the original trainer's layout (see the module docstring)."""
    if not isinstance(raw, dict):
        return False
    t = raw.get("transformations")
    loss = raw.get("loss")
    sections = [raw.get(k) for k in ("optimizer", "scheduler")]
    return any(
        (
            "model_initializer" in raw,
            "lr_step_size" in raw or "lr_gamma" in raw,
            isinstance(raw.get("model"), str),
            isinstance(t, dict) and any(isinstance(v, dict) for v in t.values()),
            isinstance(loss, dict) and any(isinstance(v, list) for v in loss.values()),
            any(isinstance(s, dict) and "type" in s for s in sections),
            isinstance(raw.get("lr_finder"), dict)
            and bool({"range_test", "optimizer"} & set(raw["lr_finder"])),
            isinstance(raw.get("model_optimization"), dict)
            and "prunning" in raw["model_optimization"],
        )
    )


def translate(raw: dict[str, Any], source: str = "config") -> Translation:
    """The original layout's keys in this trainer's layout; the warning line is logged."""
    tr = Translation({})
    out, why = tr.config, tr.unmapped
    for key, value in raw.items():
        if key in SAME or key in OWN:
            out[key] = value
        elif key in WHY:
            why[key] = WHY[key]
        elif key == "log_dir":
            _log_dir(value, out, why)
        elif key == "loss":
            _loss(value, out, why)
        elif key == "optimizer":
            _optimizer(value, raw, out, why)
        elif key == "scheduler":
            _scheduler(value, raw, out, why)
        elif key in ("lr_step_size", "lr_gamma"):
            pass  # read with the scheduler (StepLR)
        elif key == "lr_finder":
            _lr_finder(value, out, why)
        elif key == "transformations":
            _transformations(value, out, why, tr.notes)
        elif key == "model":
            _model(value, out, why)
        elif key == "model_initializer":
            if value:
                why[key] = (
                    f"{', '.join(value) if isinstance(value, dict) else value}: the models take "
                    "bg and fg_bg (RGB) and give one mask and one depth map"
                )
        elif key == "model_optimization":
            _model_optimization(value, out, why)
        else:
            why[key] = "unknown to both layouts"
    sch = raw.get("scheduler") if isinstance(raw.get("scheduler"), dict) else {}
    if sch.get("type") != "StepLR":
        unused = [k for k in ("lr_step_size", "lr_gamma") if k in raw]
        if unused:
            why[", ".join(unused)] = (
                f"used only with scheduler StepLR, this one is {sch.get('type')}"
            )
    if why:
        log.warning(tr.warning(source))
    for note in tr.notes:
        log.warning("%s: %s", source, note)
    return tr


def _log_dir(value: Any, out: dict, why: dict) -> None:
    parent = Path(str(value)).parent if value else None
    if isinstance(value, str) and parent is not None and parent.is_dir():
        out["log_dir"] = value
    else:
        why["log_dir"] = f"{value!r} is not on this machine, logs go to RUN_DIR/logs"


def _loss(value: Any, out: dict, why: dict) -> None:
    if not isinstance(value, dict):
        why["loss"] = f"{value!r}: give a list of loss names per output (mask, depth)"
        return
    loss: dict[str, str] = {}
    for head, names in value.items():
        names = names if isinstance(names, list) else [names]
        table = {"mask": MASK_LOSSES, "depth": DEPTH_LOSSES}.get(head)
        if table is None:
            why[f"loss.{head}"] = f"{names}: the outputs are mask and depth"
            continue
        known = {table[n] for n in names if n in table}
        bad = [n for n in names if n not in table]
        if head == "mask" and known == {"bce", "dice"}:
            loss["mask"] = "bce+dice"
        elif len(known) == 1:
            loss[head] = known.pop()
        elif known:
            bad = names  # several depth losses: one of ours, or densedepth's fixed mixture
        if bad:
            keep = "bce+dice" if head == "mask" else "densedepth"
            why[f"loss.{head}"] = (
                f"{', '.join(map(str, bad))}: {head} losses here: {', '.join(sorted(set(table)))}"
                f" (or {keep}); {loss.get(head, keep)} is used"
            )
    if loss:
        out["loss"] = loss


def _optimizer(value: Any, raw: dict, out: dict, why: dict) -> None:
    value = dict(value) if isinstance(value, dict) else {"type": value}
    kind = value.pop("type", None)
    name = OPTIMIZERS.get(kind)
    if name is None:
        why["optimizer.type"] = f"{kind!r}: optimizers here: {', '.join(OPTIMIZERS)}; adam is used"
        name = "adam"
    opt: dict[str, Any] = {"name": name}
    for k, v in value.items():
        if k in OPTIMIZER_KEYS and not (k in ("momentum", "nesterov") and name != "sgd"):
            opt[OPTIMIZER_KEYS[k]] = v
        elif k == "betas" and name != "sgd" and isinstance(v, list) and len(v) == 2:
            opt["beta_1"], opt["beta_2"] = v
        elif k == "lr" and "lr" not in raw:
            out["lr"] = v
        else:
            why[f"optimizer.{k}"] = f"not an option of {name} here"
    out["optimizer"] = opt


def _scheduler(value: Any, raw: dict, out: dict, why: dict) -> None:
    value = dict(value) if isinstance(value, dict) else {"type": value}
    kind = value.pop("type", None)
    name = SCHEDULERS.get(kind)
    if name is None:
        why["scheduler.type"] = (
            f"{kind!r}: schedulers here: {', '.join(SCHEDULERS)}; reduce_on_plateau is used"
        )
        return
    sch: dict[str, Any] = {"name": name}
    if name == "one_cycle":
        # The original trained one-cycle with max_lr = its lr (or the range test's lr).
        sch["max_lr"] = raw.get("lr", 1e-3)
    if name == "step":
        if "lr_step_size" in raw:
            sch["step_epochs"] = raw["lr_step_size"]
        if "lr_gamma" in raw:
            sch["gamma"] = raw["lr_gamma"]
    for k, v in value.items():
        if k in SCHEDULER_KEYS[name]:
            sch[SCHEDULER_KEYS[name][k]] = v
        else:
            why[f"scheduler.{k}"] = f"not an option of {kind} here"
    out["scheduler"] = sch


def _lr_finder(value: Any, out: dict, why: dict) -> None:
    if not isinstance(value, dict):
        why["lr_finder"] = f"{value!r}: give optimizer.lr and range_test"
        return
    finder: dict[str, Any] = {}
    for k, v in value.items():
        if k == "optimizer" and isinstance(v, dict):
            for ok, ov in v.items():
                if ok == "lr":
                    finder["start_lr"] = ov
                else:
                    why[f"lr_finder.optimizer.{ok}"] = "the range test runs the training optimizer"
        elif k == "range_test" and isinstance(v, dict):
            for rk, rv in v.items():
                if rk in RANGE_TEST_KEYS:
                    finder[RANGE_TEST_KEYS[rk]] = rv
                else:
                    why[f"lr_finder.range_test.{rk}"] = "not an option of the range test here"
        else:
            why[f"lr_finder.{k}"] = "not an option of the range test here"
    out["lr_finder"] = finder


def _transformations(value: Any, out: dict, why: dict, notes: list[str]) -> None:
    if not isinstance(value, dict):
        why["transformations"] = f"{value!r}: give train and test"
        return
    t: dict[str, list] = {}
    for part, spec in value.items():
        ours = {"train": "train", "test": "val", "val": "val"}.get(part)
        if ours is None:
            why[f"transformations.{part}"] = "the streams are train and test (val)"
            continue
        if isinstance(spec, list):  # already a list of transforms
            t[ours] = spec
            continue
        which = spec.get("which") if isinstance(spec, dict) else None
        if which not in ("albumentation", "albumentations"):
            why[f"transformations.{part}.which"] = f"{which!r}: only albumentations transforms"
            continue
        what = spec.get("what") or []
        t[ours] = [
            _pin_defaults(e, f"transformations.{ours}[{i}]", notes) for i, e in enumerate(what)
        ]
        for k in sorted(set(spec) - {"which", "what"}):
            why[f"transformations.{part}.{k}"] = "not a key of transformations"
    out["transformations"] = t


def _pin_defaults(entry: Any, where: str, notes: list[str]) -> Any:
    """The original trainer ran albumentations 0.4-0.5 (Cutout, ToTensor): where its entries
    rely on a default that albumentations 2 changed, the old default is written out. GaussNoise
    was var_limit (10, 50) in pixels, a std of 0.012-0.028; 2.x's default is 0.2-0.44."""
    noise = isinstance(entry, dict) and entry.get("name") == "GaussNoise"
    if noise and not {"var_limit", "std_range"} & set(entry):
        notes.append(
            f"{where}: GaussNoise keeps the original's default noise, var_limit [10, 50] in "
            "pixels (albumentations 2's default std_range [0.2, 0.44] is ten times stronger)"
        )
        return {**entry, "var_limit": [10.0, 50.0]}
    return entry


def _model(value: Any, out: dict, why: dict) -> None:
    if isinstance(value, dict):  # this trainer's own layout
        out["model"] = value
    elif value in MODELS:
        out["model"] = {"name": MODELS[value]}
    else:
        why["model"] = (
            f"{value!r}: models here: {', '.join(sorted(set(MODELS.values())))} (from "
            f"{', '.join(MODELS)}); unet is used"
        )


def _model_optimization(value: Any, out: dict, why: dict) -> None:
    if not isinstance(value, dict):
        why["model_optimization"] = f"{value!r}: give prunning true or false"
        return
    for k, v in value.items():
        if k == "prunning" and isinstance(v, bool):
            out["model_optimization"] = {"pruning": dict(ORIGINAL_PRUNING) if v else None}
        elif k == "pruning":
            out["model_optimization"] = {"pruning": v}
        else:
            why[f"model_optimization.{k}"] = f"{v!r}: only pruning here"


# ------------------------------------------------------------------------------ reading


_TRAILING_COMMA = re.compile(r'("(?:[^"\\]|\\.)*")|,(\s*[}\]])')


def loads_lenient(text: str) -> tuple[Any, list[int]]:
    """JSON that may have trailing commas before } or ]: (the object, the lines of the commas
    dropped). Commas inside strings are left alone; any other fault raises json's ValueError."""
    lines: list[int] = []

    def fix(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return m.group(1)
        lines.append(text.count("\n", 0, m.start()) + 1)
        return m.group(2)

    return json.loads(_TRAILING_COMMA.sub(fix, text)), sorted(set(lines))
