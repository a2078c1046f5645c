"""DefectDiffu (Shi et al., "Few-shot Defect Image Generation based on Consistency Modeling", ECCV
2024): defect image + mask generation with one segmented DiT for every product (issue 17).

Mechanisms, as the paper writes them, on the shared backbone (``nn/backbone.py``, ``arch: dit``:
``nn/dit.py``'s ``SegmentedDiT``; a DiT folder, else trained here in stage ``backbone`` on the
run's own images with captions that never name a defect type):

1. **TDIA** (text-guided diffusion with three block groups): the N background blocks are
   conditioned (adaLN) on c_p = "a photo of {product}", the M defect blocks on c_d = "a photo of
   {defect}", the K fusion blocks on c_f = "a photo of {defect} {product}", each through its
   pooled prompt (the text encoder's pooled output, ``Backbone.encode_prompts``); c_f is built from
   the *possibly dropped* words of the other two. ``defect_names`` unifies defect names across
   products (the paper's uni_defect table): "{product}/{defect}" or "{defect}" -> the word used.
2. **Double-free training** (stage ``diffu``, Algorithm 1 as written, ``draw_prompts``): every row
   drops c_p to ∅ with p1; a defective row also gets c_d -> "good" with p2 and, independently,
   drops c_p with p1 again (so c_p is dropped with 1 - (1 - p1)^2 there). ∅ is the empty prompt.
3. **Double-free sampling** (Eq. 4, ``double_free``): ε = ε(c_g,∅) + w_p(ε(c_g,c_p) - ε(c_g,∅)) +
   w_d(ε(c_d,∅) - ε(c_g,∅)), on all latent channels; c_g = "a photo of good" (what c_d becomes
   when dropped). Three model calls per step.
4. **Masks**: the defect blocks cross-attend to c_d's token states; their maps, reduced over the
   defect word's tokens (``nn/dit.py: reduce_attention``), feed the mask head predicting the mask
   latent M_f; loss_m = ||M_f - encode(mask)||^2 (the mask drawn white on black, encoded by the
   images' latent encoder). Sampling averages M_f of the defect-conditioned call over the last
   ``mask_window`` steps, decodes it, and binarises it with the isodata threshold (``isodata``),
   never below ``mask_floor``.
5. **AAL** (adaptive attention loss, ``aal_weight``): Map = the mean of those maps over blocks and
   heads, Rat = Σ(1 - mask)·Map / (Σ mask·Map + α), R = clamp(Rat, 2, 8), detached;
   loss = ||ε̂ - ε||^2 + R||mask ⊙ (ε̂ - ε)||^2 + λ·loss_m (λ = ``lambda_mask``, α = ``alpha``).

Where the ε-losses come from on the backbone trained here (x0-prediction, ``prediction_type:
sample``): see ``DefectDiffu.residual``. Stage ``diffu`` trains the whole DiT with its new layers
(prompt projections, cross-attention, mask head; rows ``balanced``: the defect-free rows teach
the good / product modes double-free sampling subtracts); the text encoder stays frozen.

Where we differ from the official code (github.com/FFDD-diffusion/DefectDiffu, read for this:
``train.py``, ``test.py``; the ``nn/dit.py`` docstring lists the architecture differences): it has
one dropping rate (``drop_rat = 0.2``), never drops a defective sample's product and writes ∅ as
the word "industry" ("a photo of good industry"; ours: p1 / p2 as Algorithm 1, ∅ = "", both rates
0.2 by default after its one); its sampling has one guidance scale applied to 3 of the 4 latent
channels (ours: Eq. 4's w_p, w_d on all channels; the defaults w_p = 3, w_d = 2 are ours, swept by
``search_spaces/defect_diffu.yaml``); it averages the mask over the last 5 of 50 steps (ours:
``mask_window`` steps of any schedule, default 5); its isodata threshold splits any map in two,
also one the mask head has not learned to draw a defect in (every value near the target's black,
a unimodal noise floor: measured 2026-12-07, such maps gave masks over half the image); ours never
thresholds below ``mask_floor`` (mid-grey 0 by default; equal to isodata on a map with a black and
a white side), so that map gives an empty mask (null: the official rule); its pooled prompts are CLIP's projected,
L2-normalised text embeddings (ours: the backbone text encoder's pooled output, unnormalised: the
learned encoder trained here has no projection to normalise, and the zero-initialised prompt
projections learn the scale); its isodata runs on the luminance (0.299 R + 0.587 G + 0.114 B) and
keeps values >= T (ours: the channel mean, > T; the target mask has three equal channels, where
the two grey values coincide); in AAL (``diffusion/gaussian_diffusion.py``) it names R
"λ", adds α = 0.0001 (the paper and we: 0.001) and does not detach R: where R is inside (2, 8)
its gradient (∂loss/∂R = ||mask ⊙ (ε̂ - ε)||² > 0) also pulls the attention into the mask, a
supervision of the maps whose strength depends on the denoising error. We detach R (it is the
loss's weight, as the issue writes it) and leave supervising the maps to the mask loss.

6. **Zero-shot** (``data.split.zero_shot: [T]``, the data layer's generic option: T's defective
   images all test, none trains; backbone and stage ``diffu`` see T's defect-free images only):
   (T, d) is sampled with Eq. 4 as any pair is. None of its three calls names T and d together,
   ε(c_g,∅), ε(c_g, c_p = T) (trained on T's good rows) and ε(c_d,∅) (trained on the other
   products' d rows with the product dropped, p1), so the defect direction w_d(ε(c_d,∅) - ε(c_g,∅))
   learned elsewhere is added to T's product direction: the transfer the paper describes. The
   paper's own zero-shot equation (Eq. 12) could not be read here (only its abstract is reachable
   offline; the official code has no zero-shot path), so this is our reading of it.

Not tried: training on more than one worker. DDP (``prepare_model`` without
``find_unused_parameters``) refuses parameters that require a gradient and get none, and the mask
head gets none in stage ``backbone`` (pretraining has no mask loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from defectforge.methods.base import Conditions, GeneratedBatch, Generator, GeneratorContext, SamplingOptions, Stage
from defectforge.methods.registry import register
from defectforge.nn.backbone import BACKBONE_PRESETS, Backbone, BackboneConfig, BackboneMethodConfig

DIFFU = "diffu"
GOOD = "good"
SAMPLING = {"sampling_time": True}
#: DiT-side fields of ``method.backbone`` per preset (the text encoder / latent fields are the shared ones).
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"patch_size": 2, "dit_heads": 2, "dit_head_dim": 16, "mask_head_channels": 16},
    # local mixing and mask_weight 2, measured (README, "Local mixing"): the plain dit draws "a defect mask" as ~5
    # scattered single-cell dots at any mask weight; with local mixing, blobs and elongated shapes (100 % non-empty,
    # area 1.5x; at 1.5: 88 %, 0.53x), and DefectDiffu on it puts holes and stains inside their masks
    "laptop": {"patch_size": 2, "dit_heads": 4, "dit_head_dim": 32, "mask_head_channels": 32, "mask_weight": 2.0,
               "dit_local_mixing": True},
    "paper": {"patch_size": 2, "dit_heads": 16, "dit_head_dim": 72, "mask_head_channels": 64},  # DiT-XL/2's width
}


class DefectDiffuConfig(BackboneMethodConfig):
    """DefectDiffu's knobs (paper group sizes 10/10/8; ``tiny`` 3/3/2). ``w_p``, ``w_d`` and
    ``mask_window`` act at sampling only: sweep trials that differ only there share one model."""

    name: Literal["defect-diffu"] = "defect-diffu"
    backbone: BackboneConfig = BackboneConfig(arch="dit")
    background_blocks: int = Field(10, ge=0, description="N: DiT blocks conditioned on c_p (paper 10)")
    defect_blocks: int = Field(10, ge=1, description="M: DiT blocks conditioned on c_d, cross-attending to it "
                                                     "(paper 10)")
    fusion_blocks: int = Field(8, ge=0, description="K: DiT blocks conditioned on c_f (paper 8)")
    p1: float = Field(0.2, ge=0, le=1, description="double-free training: c_p -> empty prompt (Algorithm 1; "
                                                   "official code's one rate 0.2)")
    p2: float = Field(0.2, ge=0, le=1, description="double-free training: a defective row's c_d -> 'good'")
    lambda_mask: float = Field(0.2, ge=0, description="λ: weight of the mask loss (paper 0.2)")
    alpha: float = Field(0.001, gt=0, description="α of AAL's ratio (paper 0.001)")
    w_p: float = Field(3.0, ge=0, description="Eq. 4: product guidance scale", json_schema_extra=SAMPLING)
    w_d: float = Field(2.0, ge=0, description="Eq. 4: defect guidance scale", json_schema_extra=SAMPLING)
    mask_window: int = Field(5, ge=1, description="sampling: the mask averages the mask head over this many last "
                                                  "steps (official 5 of 50)", json_schema_extra=SAMPLING)
    mask_floor: float | None = Field(0.0, description="sampling: the isodata threshold is never below this grey "
                                                      "(0 = midway between the target's black -1 and white +1), "
                                                      "so a map with no white side gives an empty mask, not "
                                                      "half of its noise; null = isodata alone (official)",
                                     json_schema_extra=SAMPLING)
    defect_names: dict[str, str] = Field(default_factory=dict, description="unified defect words: "
                                                                           "'{product}/{defect}' or '{defect}' -> "
                                                                           "word (the paper's uni_defect table)")
    diffu_steps: int | None = Field(None, ge=1, description="stage diffu's steps (null = train.steps)")

    @model_validator(mode="after")
    def _dit(self) -> DefectDiffuConfig:
        if self.backbone.arch != "dit":
            raise ValueError("defect-diffu runs on a DiT: method.backbone.arch must be 'dit'")
        return self

    @classmethod
    def preset(cls, name: str) -> dict[str, Any]:
        if name not in DIT_PRESETS:
            return {}
        backbone = {**BACKBONE_PRESETS[name], **DIT_PRESETS[name], "arch": "dit"}
        if name == "tiny":
            return {"backbone": backbone, "background_blocks": 3, "defect_blocks": 3, "fusion_blocks": 2}
        if name == "laptop":
            # lambda_mask 4 and 600 diffu steps, measured (README, 2026-12-07): at the paper's 0.2 or at
            # 300 steps the mask head has not yet drawn a white side anywhere (every mask empty)
            return {"backbone": backbone, "background_blocks": 3, "defect_blocks": 3, "fusion_blocks": 2,
                    "backbone_steps": 600, "backbone_lr": 5e-4, "diffu_steps": 600, "lambda_mask": 4.0}
        return {"backbone": backbone, "background_blocks": 10, "defect_blocks": 10, "fusion_blocks": 8}

    @classmethod
    def run_preset(cls, name: str) -> dict[str, Any]:
        """Multi-product by default (every preset): one DiT for all products is the paper's point
        (the inter-product defect consistency, and zero-shot transfer, need the products together);
        ``--mode per-product`` / ``train.mode`` still trains one per product."""
        return {"train": {"mode": "multi-product"}}

    def pretraining(self) -> dict[str, Any] | None:
        """The backbone stage also depends on the group sizes (they fix which blocks cross-attend)."""
        out = super().pretraining()
        if out is not None:
            out["fields"] = [*out["fields"], "background_blocks", "defect_blocks", "fusion_blocks"]
        return out

    def trains_on_good(self) -> bool:
        """Always: stage ``diffu`` trains on balanced rows (the defect-free rows teach c_d = "good"),
        also on a backbone loaded from ``backbone.path``, where no backbone stage needs them."""
        return True

    def zero_shot(self) -> bool:
        """Yes (``data.split.zero_shot``): Eq. 4 draws (T, d) from ε(c_g,∅), ε(c_g,c_p = T) and
        ε(c_d,∅); none names T and d together, so each call is one a product with defect-free
        images only was trained on (c_p = T on its good rows) or one the other products' defects
        trained (c_d with the product dropped, Algorithm 1's p1): the defect direction is
        transferred from the products that have d."""
        return True


# ----------------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class PromptDraw:
    """One training batch's prompts (``draw_prompts``) and what was dropped per row."""

    c_p: list[str]
    c_d: list[str]
    c_f: list[str]
    defect_word: list[str]  # the word c_d names ("good" where defect-free or dropped)
    dropped_p: list[bool]
    good_d: list[bool]


def prompt_p(product: str) -> str:
    return f"a photo of {product}" if product else ""


def prompt_d(word: str) -> str:
    return f"a photo of {word}"


def prompt_f(word: str, product: str) -> str:
    return " ".join(("a photo of", word, product)).rstrip() if product else f"a photo of {word}"


def draw_prompts(products: list[str], defects: list[str | None], p1: float, p2: float,
                 generator: torch.Generator | None) -> PromptDraw:
    """Algorithm 1 as written: every row drops c_p with ``p1``; a defective row (``defects[i]`` not
    None) also gets c_d -> "good" with ``p2`` and, independently, drops c_p with ``p1`` again. c_f
    is composed from the words left ("a photo of good" for a defect-free row without product)."""
    n = len(products)
    u = torch.rand(n, 3, generator=generator).tolist()
    out: dict[str, list[Any]] = {k: [] for k in ("c_p", "c_d", "c_f", "defect_word", "dropped_p", "good_d")}
    for (a, b, c), product, defect in zip(u, products, defects):
        drop = a < p1
        swap = False
        if defect is not None:
            swap = b < p2
            drop = drop or c < p1
        word = GOOD if defect is None or swap else defect
        kept = "" if drop else product
        out["c_p"].append(prompt_p(kept))
        out["c_d"].append(prompt_d(word))
        out["c_f"].append(prompt_f(word, kept))
        out["defect_word"].append(word)
        out["dropped_p"].append(drop)
        out["good_d"].append(defect is None or swap)
    return PromptDraw(**out)


def double_free(uncond: torch.Tensor, product: torch.Tensor, defect: torch.Tensor, w_p: float,
                w_d: float) -> torch.Tensor:
    """Eq. 4: ε(c_g,∅) + w_p(ε(c_g,c_p) - ε(c_g,∅)) + w_d(ε(c_d,∅) - ε(c_g,∅)), every channel.

    The weights sum to 1, so combining x0- (or v-) predictions gives the prediction whose ε is this
    combination of the three ε's (``Backbone.to_eps`` is affine in the prediction at fixed z_t, t):
    the formula holds in the backbone's own parameterisation."""
    return uncond + w_p * (product - uncond) + w_d * (defect - uncond)


def aal_weight(attention_map: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """AAL's R per sample (B): Rat = Σ(1 - mask)·Map / (Σ mask·Map + α), clamped to [2, 8] and
    detached (a weight of the loss, not a path for gradients). ``attention_map``: B x gh x gw, the
    mean of the defect blocks' maps; ``mask``: B x gh x gw in {0, 1} on the same grid. The more
    attention falls outside the defect, the larger the weight of the in-mask loss."""
    m = mask.to(attention_map.dtype)
    outside = ((1 - m) * attention_map).flatten(1).sum(1)
    inside = (m * attention_map).flatten(1).sum(1)
    return (outside / (inside + alpha)).clamp(2.0, 8.0).detach()


def isodata(values: np.ndarray, tol: float = 1e-6, max_iter: int = 256) -> float:
    """The isodata (Ridler-Calvard intermeans) threshold of ``values``: t = the mean of the means
    below-or-at and above t, iterated from the overall mean. scikit-image (``threshold_isodata``)
    is not installed in this environment, and the iteration is five lines on the exact values (no
    256-bin histogram). A constant map returns its value (``values > t`` is then empty)."""
    x = np.asarray(values, np.float64).ravel()
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return lo
    t = float(x.mean())
    for _ in range(max_iter):
        new = 0.5 * (float(x[x <= t].mean()) + float(x[x > t].mean()))
        if abs(new - t) <= tol:
            return new
        t = new
    return t


@dataclass
class Encoded:
    """One conditioning of the DiT: pooled prompts by group, c_d's token states, the defect word's
    tokens (what the mask head and AAL read)."""

    pooled: dict[str, torch.Tensor]
    states: torch.Tensor
    tokens: torch.Tensor


@register
class DefectDiffu(Generator):
    """See the module docstring. Saved modules: ``backbone`` (trained here or copied; the DiT inside
    it, ``backbone.transformer``, is what stage ``diffu`` trains), or, with a folder's backbone,
    ``dit`` (the loaded DiT, fine-tuned and saved; the VAE / text encoder stay the folder's)."""

    config_class = DefectDiffuConfig

    def __init__(self, config: DefectDiffuConfig, context: GeneratorContext) -> None:
        super().__init__(config, context)
        self.backbone = Backbone(config.backbone, context.products, context.resolution,
                                 dit_groups=(config.background_blocks, config.defect_blocks, config.fusion_blocks))

    # ----------------------------------------------------------------------------- training
    @property
    def _module(self) -> str:
        """Stage diffu's module: the DiT alone, so the text encoder does not even require a gradient
        there. Named ``backbone.transformer`` where it is saved inside module ``backbone`` (so the
        names of what changes start with the stage's module), ``dit`` where it is saved alone."""
        return "dit" if self.backbone.source == "folder" else "backbone.transformer"

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {**self.backbone.trainable_modules(), self._module: self.backbone.transformer}

    def saved_modules(self) -> dict[str, nn.Module]:
        if self.backbone.source == "folder":
            return {"dit": self.backbone.transformer}
        return {"backbone": self.backbone}

    def stages(self) -> list[Stage]:
        c = self.config
        return [*self.backbone.stages(steps=c.backbone_steps, lr=c.backbone_lr),
                Stage(DIFFU, (self._module,), steps=c.diffu_steps, rows="balanced")]

    def prepare_from_data(self, rows: list[dict[str, Any]]) -> None:
        self.backbone.initialise()  # a backbone copied from another defectforge checkpoint

    def word(self, product: str, defect: str) -> str:
        """The defect's word in the prompts (``defect_names``, product-specific first)."""
        names = self.config.defect_names
        return names.get(f"{product}/{defect}", names.get(defect, defect)).replace("_", " ")

    @staticmethod
    def product_word(product: str) -> str:
        return product.replace("_", " ")

    def defect_tokens(self, words: list[str]) -> torch.Tensor:
        """B x L bool: the tokens of the word in "a photo of {word}" (c_d)."""
        tok, length = self.backbone.tokenizer, self.backbone.max_tokens
        head = tok("a photo of").input_ids[:-1]
        rows = []
        for w in words:
            full = tok(prompt_d(w)).input_ids[:length]
            if full[:len(head)] != head:
                raise ValueError(f"{type(tok).__name__} does not tokenise {prompt_d(w)!r} with its prefix first")
            end = len(full) - 1 if full[-1] == tok.eos_token_id else len(full)
            rows.append([len(head) <= j < end for j in range(length)])
        return torch.tensor(rows, device=self.backbone.device)

    def encode(self, c_p: list[str], c_d: list[str], c_f: list[str], words: list[str]) -> Encoded:
        """The three prompts through the (frozen in stage diffu) text encoder."""
        bb = self.backbone
        with torch.no_grad():
            _, pooled_p = bb.encode_prompts(c_p)
            states, pooled_d = bb.encode_prompts(c_d)
            _, pooled_f = bb.encode_prompts(c_f)
        return Encoded({"background": pooled_p, "defect": pooled_d, "fusion": pooled_f}, states,
                       self.defect_tokens(words))

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: Encoded) -> Any:
        """One DiT call (``SegmentedDiTOutput``): sample, mask_latent, attention_maps."""
        return self.backbone.transformer(z_t, t, cond.pooled, cond.states, mask_tokens=cond.tokens)

    def residual(self, pred: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The residual the ε-losses square: ``pred - target`` in the backbone's parameterisation.

        On an ε-prediction backbone (a DiT folder) it is ε̂ - ε, the paper's. On the x0-prediction
        backbone trained here, ``Backbone.to_eps`` gives ε̂ = (z_t - √ᾱ x̂0)/√(1-ᾱ), so
        ε̂ - ε = -√(ᾱ/(1-ᾱ))(x̂0 - x0): the ε-loss is the x0-loss weighted by the signal-to-noise
        ratio ᾱ/(1-ᾱ), ~1e5 at the smallest t of the cosine schedule; a few near-clean samples would
        drive training (AnomalyDiffusion's ``masked_loss`` has the same reason). We square x̂0 - x0,
        i.e. the ε residual times √((1-ᾱ)/ᾱ) per sample. AAL is unchanged by it: R multiplies the
        in-mask part of the same residual, so a per-sample weight scales both terms alike."""
        return pred.float() - self.backbone.target(z0, noise, t).float()

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Pixel mask B x H x W -> B x 1 x h x w, max-pooled (any defect pixel marks the cell)."""
        f = self.backbone.downsample
        return F.max_pool2d((mask > 0).float().unsqueeze(1), kernel_size=f, stride=f)

    def training_step(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        if stage == "backbone":
            return self.backbone.pretraining_loss(batch)
        if stage != DIFFU:
            raise ValueError(f"defect-diffu has stages backbone, {DIFFU}; not {stage!r}")
        # here, not at module level: nn/dit imports diffusers' attention blocks, and registry
        # discovery imports every method (the Backbone builds the DiT with the same deferred import)
        from defectforge.nn.dit import reduce_attention

        c, bb = self.config, self.backbone
        products, defects = [], []
        for p, d in zip(batch["product"].tolist(), batch["defect"].tolist()):
            name = self.context.products[p]
            products.append(self.product_word(name))
            defects.append(self.word(name, self.context.classes[name][d - 1]) if d > 0 else None)
        draw = draw_prompts(products, defects, c.p1, c.p2, None)  # the loop's seeded global generator
        cond = self.encode(draw.c_p, draw.c_d, draw.c_f, draw.defect_word)
        binary = (batch["mask"] > 0).float()
        z0 = bb.encode(batch["image"])
        with torch.no_grad():
            mask_target = bb.encode((binary * 2 - 1).unsqueeze(1).expand_as(batch["image"]))
        noise = torch.randn_like(z0)
        t = torch.randint(0, int(bb.noise_scheduler.config.num_train_timesteps), (z0.shape[0],), device=z0.device)
        z_t = bb.noise_scheduler.add_noise(z0, noise, t)
        out = self.predict(z_t, t, cond)
        res = self.residual(out.sample, z0, noise, t)
        m_lat = self.latent_mask(batch["mask"])
        p = bb.transformer.config.patch_size
        grid = (z0.shape[2] // p, z0.shape[3] // p)
        attention = reduce_attention(out.attention_maps, cond.tokens, grid).mean(1)  # Map: B x gh x gw
        r = aal_weight(attention, F.max_pool2d(m_lat, p)[:, 0], c.alpha)
        mse = (res**2).mean()
        loss_d = (r * ((m_lat * res) ** 2).flatten(1).mean(1)).mean()
        loss_m = F.mse_loss(out.mask_latent.float(), mask_target.float())
        loss = mse + loss_d + c.lambda_mask * loss_m
        return {"loss": loss, "diffu_mse": mse.detach(), "aal": loss_d.detach(), "mask_mse": loss_m.detach(),
                "aal_r": r.mean()}

    # ----------------------------------------------------------------------------- sampling
    def _check(self, conditions: Conditions) -> None:
        for p, d in zip(conditions.product, conditions.defect):
            if p not in self.context.products or d not in self.context.classes.get(p, ()):
                known = ", ".join(f"{a}/{b}" for a in self.context.products for b in self.context.classes[a])
                raise KeyError(f"defect-diffu does not know {p}/{d}; it knows {known}")

    def guidance_conditions(self, products: list[str], defects: list[str]) -> tuple[Encoded, Encoded, Encoded]:
        """The three conditionings of Eq. 4: (c_g, ∅), (c_g, c_p), (c_d, ∅)."""
        n = len(products)
        words = [self.word(p, d) for p, d in zip(products, defects)]
        prods = [self.product_word(p) for p in products]
        good = [GOOD] * n
        uncond = self.encode([""] * n, [prompt_d(GOOD)] * n, [prompt_f(GOOD, "")] * n, good)
        product = self.encode([prompt_p(p) for p in prods], [prompt_d(GOOD)] * n,
                              [prompt_f(GOOD, p) for p in prods], good)
        defect = self.encode([""] * n, [prompt_d(w) for w in words], [prompt_f(w, "") for w in words], words)
        return uncond, product, defect

    @torch.no_grad()
    def generate(self, products: list[str], defects: list[str], seed: int,
                 options: SamplingOptions | None = None) -> tuple[torch.Tensor, np.ndarray, list[float]]:
        """Images (B x 3 x H x W in [-1, 1]), binary masks (B x H x W uint8) and each mask's
        isodata threshold, drawn with double-free guidance from pure noise (module docstring 3-4)."""
        options = options or self.default_sampling
        cfg = self.sampling_config(options)
        bb = self.backbone
        n, dev = len(products), bb.device
        g = torch.Generator().manual_seed(int(seed))
        z = torch.randn(n, bb.latent_channels, bb.latent_size, bb.latent_size, generator=g).to(dev)
        uncond, product, defect = self.guidance_conditions(products, defects)
        sched = bb.make_scheduler(options.sampler, options.steps)
        steps = list(sched.timesteps)
        window = min(cfg.mask_window, len(steps))
        acc = torch.zeros_like(z)
        for i, t in enumerate(steps):
            tt = torch.full((n,), int(t), device=dev, dtype=torch.long)
            outs = [self.predict(z, tt, c) for c in (uncond, product, defect)]
            pred = double_free(outs[0].sample, outs[1].sample, outs[2].sample, cfg.w_p, cfg.w_d)
            if i >= len(steps) - window:
                acc += outs[2].mask_latent  # the defect-conditioned call's mask (c_d's cross-attention)
            z = bb.step(sched, options.sampler, pred, t, z, g)
        images = bb.decode(z).clamp(-1, 1)
        drawn = bb.decode(acc / window).mean(1).float().cpu().numpy()
        floor = -np.inf if cfg.mask_floor is None else cfg.mask_floor
        thresholds = [max(isodata(m), floor) for m in drawn]
        masks = np.stack([(m > th) for m, th in zip(drawn, thresholds)]).astype(np.uint8)
        return images, masks, thresholds

    @torch.no_grad()
    def sample(self, n: int, conditions: Conditions, seed: int,
               options: SamplingOptions | None = None) -> GeneratedBatch:
        if len(conditions) != n:
            raise ValueError(f"sample: {n} requested, {len(conditions)} conditions")
        self._check(conditions)
        images, masks, thresholds = self.generate(list(conditions.product), list(conditions.defect), seed, options)
        return self.pairs(images, masks, conditions, extras={"method": "defect-diffu",
                                                             "mask_thresholds": thresholds})
