"""``latentwatch explain``: which model components a drift alarm rests on, by intervention, offline.

Given the texts of an alarmed window (from text retention, or the application's own logs), the baseline
and probes the sidecar ran with, and the model, the window is run through the model again:

1. as served, giving each detector's statistic on the window (the same code the analyzer runs);
2. once per **component** near the alarmed site (every attention head of the site's layer and the
   ``layers_back`` layers before it, and each of those layers' MLP block) with that component
   **ablated**: zeroed, or replaced by its mean output over reference texts (``mean``; the baseline's
   kind of traffic). A component whose ablation brings the statistic back under the threshold is one
   the shift travels through;
3. a **pairwise search** over the components whose single ablation moved the statistic most, in the
   spirit of SPEX/ProxySPEX's sparse interaction search (Kang et al., 2025) but exhaustive over the few
   strongest: the pairs whose joint effect differs most from the sum of their single effects.

Every run is counted in forward passes of one text; ``budget`` caps them (singles first, then pairs).
The evidence is **interventional** for these texts (what the statistic does when a component is removed),
not a proof of mechanism: ablation takes the model off its normal operating point, and a component that
matters for everything moves every statistic. The alarm's own attribution (the components of the
detector's view that moved most) is **correlational**; both are reported, each labelled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.analysis import signals
from monitor.analysis.baseline import Baseline
from monitor.probes.probe import ProbeSet

EVIDENCE_ABLATION = "interventional: statistic on this window with the component ablated"
EVIDENCE_ATTRIBUTION = "correlational: the components of the detector's view that moved most in the window"


class ExplainError(ValueError):
    """A model, window or detector that cannot be explained (wrong model, too few texts, unknown detector)."""


@dataclass(frozen=True)
class Component:
    """An attention head (``index`` = head) or an MLP block (``index`` None) of one layer."""

    layer: int
    kind: str  # "head" or "mlp"
    index: int | None = None

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.attn head {self.index}" if self.kind == "head" else f"layers.{self.layer}.mlp"


def _attention_output(block: Any) -> Any:
    """The projection that mixes the heads back into the residual stream (its input is the heads side by side)."""
    for attn_name in ("self_attn", "attn", "attention", "self_attention"):
        attn = getattr(block, attn_name, None)
        if attn is None:
            continue
        for proj in ("o_proj", "out_proj", "c_proj", "dense"):
            if hasattr(attn, proj):
                return getattr(attn, proj)
        output = getattr(attn, "output", None)  # BERT: attention.output.dense
        if output is not None and hasattr(output, "dense"):
            return output.dense
    raise ExplainError(f"{type(block).__name__}: no attention output projection found (o_proj, out_proj, c_proj, "
                       "attention.output.dense); explain supports Llama-, GPT-2- and BERT-style blocks")


def _mlp(block: Any) -> Any:
    for name in ("mlp", "feed_forward", "ffn"):
        if hasattr(block, name):
            return getattr(block, name)
    raise ExplainError(f"{type(block).__name__}: no MLP module found (mlp, feed_forward, ffn)")


def head_count(model: Any) -> int:
    config = model.config
    return int(getattr(config, "num_attention_heads", None) or config.n_head)


def components_near(model: Any, layer: int, layers_back: int = 2) -> list[Component]:
    """Every head and the MLP of ``layer`` and the ``layers_back`` layers before it."""
    heads = head_count(model)
    out = []
    for li in range(max(0, layer - layers_back), layer + 1):
        out += [Component(li, "head", h) for h in range(heads)]
        out.append(Component(li, "mlp"))
    return out


@contextmanager
def ablated(model: Any, components: Sequence[Component], means: dict[Component, Any] | None = None) -> Iterator[None]:
    """Within the block, ``components`` are zeroed (or set to ``means[component]``, a vector)."""
    import torch

    from collectors.sites import find_blocks

    _, blocks = find_blocks(model)
    heads = head_count(model)
    handles = []
    by_layer: dict[int, list[Component]] = {}
    for c in components:
        by_layer.setdefault(c.layer, []).append(c)
    for layer, comps in by_layer.items():
        block = blocks[layer]
        head_comps = [c for c in comps if c.kind == "head"]
        if head_comps:
            proj = _attention_output(block)

            def pre_hook(module: Any, args: tuple, head_comps: list[Component] = head_comps) -> tuple:
                x = args[0]
                d = x.shape[-1] // heads
                x = x.clone()
                for c in head_comps:
                    sl = slice(c.index * d, (c.index + 1) * d)
                    x[..., sl] = 0.0 if means is None else means[c].to(x.dtype)
                return (x, *args[1:])

            handles.append(proj.register_forward_pre_hook(pre_hook))
        if any(c.kind == "mlp" for c in comps):
            mlp_comp = next(c for c in comps if c.kind == "mlp")

            def hook(module: Any, args: tuple, output: Any, c: Component = mlp_comp) -> Any:
                out = output[0] if isinstance(output, tuple) else output
                new = torch.zeros_like(out) if means is None else means[c].to(out.dtype).expand_as(out).clone()
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(_mlp(block).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def component_means(lm: Any, texts: list[str], components: Sequence[Component], max_length: int) -> dict:
    """Each component's mean output over ``texts`` (every real token), for mean ablation."""
    import torch

    from collectors.sites import find_blocks

    _, blocks = find_blocks(lm.model)
    heads = head_count(lm.model)
    sums: dict[Component, Any] = {}
    count = [0]
    mask_holder: dict[str, Any] = {}
    handles = []
    layers = sorted({c.layer for c in components})
    for layer in layers:
        def pre_hook(module: Any, args: tuple, layer: int = layer) -> None:
            x = args[0].detach()
            m = mask_holder["mask"][..., None].to(x.dtype)
            d = x.shape[-1] // heads
            total = (x * m).sum(dim=(0, 1))
            for h in range(heads):
                key = Component(layer, "head", h)
                sums[key] = sums.get(key, 0) + total[h * d:(h + 1) * d]

        def hook(module: Any, args: tuple, output: Any, layer: int = layer) -> None:
            out = (output[0] if isinstance(output, tuple) else output).detach()
            m = mask_holder["mask"][..., None].to(out.dtype)
            key = Component(layer, "mlp")
            sums[key] = sums.get(key, 0) + (out * m).sum(dim=(0, 1))

        handles.append(_attention_output(blocks[layer]).register_forward_pre_hook(pre_hook))
        handles.append(_mlp(blocks[layer]).register_forward_hook(hook))
    tok = lm.tokenizer
    tok.padding_side = "right"
    try:
        with torch.no_grad():
            for start in range(0, len(texts), 8):
                enc = tok(texts[start:start + 8], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length)
                mask_holder["mask"] = enc["attention_mask"]
                count[0] += int(enc["attention_mask"].sum())
                lm.model(**enc)
    finally:
        for h in handles:
            h.remove()
    return {c: sums[c] / max(1, count[0]) for c in components}


def window_view(lm: Any, texts: list[str], baseline: Baseline, probes: ProbeSet | None, max_length: int
                ) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Each detector's statistic on the window of ``texts``, each concept's mean score, and each detector's
    components (what moved, in the detector's own view)."""
    from monitor.probes.activations import run_texts

    records = run_texts(lm, texts, list(baseline.shapes), max_length=max_length, progress=False)
    sig = signals.extract(records, baseline.shapes, probes)
    stats, moved = {}, {}
    for slot in baseline.slots:
        rows = slot.detector.transform(sig[slot.family])
        stats[slot.name] = float(slot.detector.statistic(rows[None])[0])
        moved[slot.name] = np.asarray(slot.detector.components(rows), dtype=np.float64)
    scores = {c: float(v) for c, v in zip(probes.concepts, sig["scores"].mean(axis=0), strict=True)} if probes else {}
    return stats, scores, moved


def _layer_of(model: Any, family: str, probes: ProbeSet | None, concept: str | None) -> int:
    """The last layer whose components are ablated: the detector's site (the layer before an attention
    site: a layer's own heads do not change its attention pattern), or the site of the probe of the concept
    that moved most (detectors on probe scores)."""
    from collectors.sites import SiteError, resolve

    if ":" in family:
        site = family.split(":", 1)[1]
    elif probes is None:
        raise ExplainError("the detector reads probe scores but no probes were given")
    else:
        site = next((p.site for p in probes.probes if p.concept == concept), "")
    try:
        resolved = resolve(model, site)
    except SiteError as exc:
        raise ExplainError(f"cannot explain at site {site!r}: {exc}") from exc
    if resolved.layer is None:
        raise ExplainError(f"site {site!r} is not inside a transformer block: nothing to ablate before it")
    layer = resolved.layer - 1 if resolved.kind == "attn" else resolved.layer
    if layer < 0:
        raise ExplainError(f"site {site!r} is the first block's attention: no components come before it")
    return layer


def explain(lm: Any, texts: list[str], baseline: Baseline, probes: ProbeSet | None, *, detector: str | None = None,
            budget: int = 5000, layers_back: int = 2, ablation: str = "zero", reference_texts: list[str] | None = None,
            max_length: int = 48, top_pairs: int = 6) -> dict[str, Any]:
    """Rank the components near ``detector``'s site by what ablating them does to its statistic on ``texts``."""
    from collectors.fingerprint import fingerprint

    t0 = time.perf_counter()
    fp = fingerprint(lm.model)
    if fp != baseline.fingerprint:
        raise ExplainError(f"the baseline was built on {baseline.fingerprint}; this model is {fp}: explain with the "
                           "model the sidecar watched")
    if len(texts) < baseline.config.window:
        raise ExplainError(f"{len(texts)} texts; the baseline's window is {baseline.config.window}: give the whole "
                           "alarmed window")
    texts = texts[-baseline.config.window:]
    slots = {s.name: s for s in baseline.slots}
    stats, scores, moved = window_view(lm, texts, baseline, probes, max_length)
    passes = len(texts)
    if detector is None:  # the detector most over its threshold on this window
        detector = max(slots, key=lambda n: stats[n] / slots[n].threshold if slots[n].threshold > 0 else 0.0)
    if detector not in slots:
        raise ExplainError(f"no detector {detector!r} in this baseline; it has: {', '.join(slots)}")
    slot = slots[detector]
    threshold = slot.threshold
    concept, up = None, True  # detectors on probe scores: the concept that moved most, and which way
    if slot.family == "scores" and len(moved[detector]):
        j = int(np.argmax(np.abs(moved[detector])))
        concept, up = slot.components[j].split(" ", 1)[0], bool(moved[detector][j] >= 0)
    if not threshold > 0:
        raise ExplainError(f"{detector} has threshold {threshold}: nothing to compare a change with")
    comps = components_near(lm.model, _layer_of(lm.model, slot.family, probes, concept), layers_back)
    means = None
    if ablation == "mean":
        if not reference_texts:
            raise ExplainError("mean ablation needs reference texts (the baseline's kind of traffic)")
        means = component_means(lm, reference_texts, comps, max_length)
        passes += len(reference_texts)
    elif ablation != "zero":
        raise ExplainError(f"ablation must be zero or mean, not {ablation!r}")

    def effect(group: Sequence[Component]) -> tuple[float, dict[str, float]]:
        with ablated(lm.model, group, means):
            s, c, _ = window_view(lm, texts, baseline, probes, max_length)
        return s[detector], c

    singles = []
    for comp in comps:
        if passes + len(texts) > budget:
            break
        value, ablated_scores = effect([comp])
        passes += len(texts)
        singles.append({"component": comp.name, "statistic": value, "ratio": value / threshold,
                        "change": (value - stats[detector]) / threshold,
                        "concept_change": {k: round(ablated_scores[k] - scores[k], 4) for k in scores},
                        "_comp": comp})
    # by the change of the statistic; ties (a saturated rank statistic does not move) by how far the ablation
    # takes the moved concept's mean score back towards the baseline
    singles.sort(key=lambda r: (round(r["change"], 2),
                                (r["concept_change"].get(concept, 0.0) * (1 if up else -1)) if concept else 0.0))
    pairs = []
    strongest = [r for r in sorted(singles, key=lambda r: -abs(r["change"]))][:top_pairs]
    for i in range(len(strongest)):
        for j in range(i + 1, len(strongest)):
            if passes + len(texts) > budget:
                break
            a, b = strongest[i], strongest[j]
            value, _ = effect([a["_comp"], b["_comp"]])
            passes += len(texts)
            change = (value - stats[detector]) / threshold
            pairs.append({"components": [a["component"], b["component"]], "ratio": value / threshold,
                          "change": change, "interaction": change - (a["change"] + b["change"])})
    pairs.sort(key=lambda r: -abs(r["interaction"]))
    for r in singles:
        del r["_comp"]
        for k in ("statistic", "ratio", "change"):
            r[k] = round(float(r[k]), 4)
    for r in pairs:
        for k in ("ratio", "change", "interaction"):
            r[k] = round(float(r[k]), 4)
    alarmed = stats[detector] > threshold
    restoring = [r["component"] for r in singles if alarmed and r["ratio"] <= 1.0]
    restoring_pairs = [r["components"] for r in pairs if alarmed and r["ratio"] <= 1.0]
    return {
        "detector": detector, "threshold": round(threshold, 6), "statistic": round(stats[detector], 6),
        "ratio": round(stats[detector] / threshold, 4), "in_alarm": stats[detector] > threshold,
        "window": len(texts), "ablation": ablation, "layers": sorted({c.layer for c in comps}),
        "concept": concept,
        "statistic_moved": any(abs(r["change"]) >= 0.01 for r in singles),
        "components_tried": len(singles), "components_near_site": len(comps),
        "singles": singles, "pairs": pairs[:10], "restoring": restoring, "restoring_pairs": restoring_pairs,
        "concept_scores": {k: round(v, 4) for k, v in scores.items()},
        "all_detectors": {n: round(stats[n] / slots[n].threshold, 4) for n in slots if slots[n].threshold > 0},
        "forward_passes": passes, "budget": budget, "seconds": round(time.perf_counter() - t0, 1),
        "evidence": {"singles": EVIDENCE_ABLATION, "pairs": EVIDENCE_ABLATION + " (two at once)"},
        "caveat": "Ablation is an intervention on these texts: it shows what the statistic does without a "
                  "component, not how the model computes; a component that matters for everything moves every "
                  "statistic. Probe scores remain correlational evidence.",
    }
