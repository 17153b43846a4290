"""What a reviewer checks before trusting a comparison, from config.json alone: the input each model saw
(pixels, token grid), the head and decision rule, and the tuning budget of each pair."""
from __future__ import annotations

import re

from bakeoff.reports.artifacts import Pair, dig

CNN_STRIDE = 32  # the final feature map of the registry's CNNs is 1/32 of the input


def patch_size(backbone: dict) -> int | None:
    """A ViT's patch size from its timm / open_clip architecture name (``..._patch14_...``, ``ViT-B-32``)."""
    m = re.search(r"patch(\d+)", backbone.get("arch", "")) or re.search(r"ViT-[A-Za-z]+-(\d+)", backbone.get("arch", ""))
    return int(m.group(1)) if m else None


def token_grid(config: dict) -> str:
    """``8x8 patches`` for a ViT, ``7x7 feature map`` for a CNN, from the run's input size."""
    px = dig(config, "preprocess.img_size")
    if px is None:
        return "—"
    patch = patch_size(config.get("backbone", {}))
    if patch:
        return f"{px // patch}x{px // patch} patches of {patch} px"
    return f"{-(-px // CNN_STRIDE)}x{-(-px // CNN_STRIDE)} final feature map"


def configs_of(pairs: list[Pair]) -> dict[str, dict]:
    return {p.name: p.config.doc for p in pairs}


def resolution_note(configs: dict[str, dict]) -> str:
    """A sentence when families were compared at different input sizes, or below their native size."""
    sizes = {c.get("family", name): dig(c, "preprocess.img_size") for name, c in configs.items()}
    reduced = [f"{name} ({dig(c, 'preprocess.img_size')} px, native {c['native_img_size']})"
               for name, c in configs.items()
               if (c.get("native_img_size") or 0) > (dig(c, "preprocess.img_size") or 0)]
    out = []
    if len({s for s in sizes.values() if s is not None}) > 1:
        out.append("The families were compared at different input sizes ("
                   + ", ".join(f"{f} {s} px" for f, s in sizes.items()) + "): a ViT's token grid and a CNN's "
                   "feature map shrink with the input, so a smaller input handicaps its family.")
    if reduced:
        out.append("Reduced below the model's native input size: " + ", ".join(reduced) + ".")
    return " ".join(out)


def head_text(config: dict) -> str:
    """The head and decision rule: its input where it is more than the pooled features (``--colour``), softmax
    fields (arg-max, logit adjustment tau) and thresholded tags."""
    head, dec = config.get("head") or {}, config.get("decision") or {}
    if not head:
        return "sigmoid per tag, thresholds fitted on validation (recorded before heads were)"
    groups = head.get("groups") or {}
    parts = []
    if groups:
        tau = dec.get("logit_adjust_tau")
        parts.append(f"softmax over {len(groups)} single-valued fields ({', '.join(groups)}), arg-max"
                     + (f", logit adjustment tau {tau:g}" if isinstance(tau, (int, float)) else ""))
    free = dec.get("free_tags")
    if free:
        shrink = dec.get("threshold_shrink")
        parts.append(f"{free} sigmoid tags with validation thresholds"
                     + (f" shrunk to their bucket (strength {shrink:g})" if shrink else ""))
    colour = config.get("colour")
    inputs = f"head input: pooled features + {colour.get('dim')} colour-histogram numbers; " \
        if isinstance(colour, dict) else ""
    return inputs + (f"{head.get('loss', 'bce')} loss; " + "; ".join(parts) if parts else head.get("kind", "—"))


def tuning_text(config: dict) -> str:
    """``8 trials: weight decay (AdamW, decoupled) on [0.001 .. 30], selected 0.362 by validation macro mAP``."""
    t = dig(config, "summary.tuning")
    if not t:
        return "budget not recorded (trained before tuning budgets were)"
    grid = t.get("grid") or []
    chosen = dig(config, "summary.selected.weight_decay") if config.get("strategy") == "probe" \
        else dig(config, "summary.finetune.lr")
    span = f" on [{min(grid):g} .. {max(grid):g}]" if len(grid) > 1 else (f" = {grid[0]:g}" if grid else "")
    picked = isinstance(chosen, (int, float)) and len(grid) > 1
    edge = picked and len(grid) > 2 and chosen in (min(grid), max(grid))
    return (f"{t.get('trials')} trial{'s' if t.get('trials') != 1 else ''}: {t.get('searched')}{span}"
            + (f", selected {chosen:g}" if picked else "")
            + (f" (the grid's {'lowest' if chosen == min(grid) else 'highest'}: the best may lie beyond it)"
               if edge else ""))


def budget_note(configs: dict[str, dict]) -> str:
    """A sentence when the pairs' tuning budgets (trials) differ."""
    trials = {name: dig(c, "summary.tuning.trials") for name, c in configs.items()}
    if len(set(trials.values())) <= 1:
        return ""
    return ("Tuning budgets differ between pairs (" + ", ".join(f"{k}: {v if v is not None else 'not recorded'}"
                                                            for k, v in trials.items())
            + " trials): a pair with fewer trials may be under-tuned, which handicaps it, not the others.")
