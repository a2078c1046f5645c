"""Crop-Paste: the model-free baseline every defect-generation paper compares against.

Idea: cut the real few-shot defects out with their masks and paste them, at a random position,
scale and rotation, onto defect-free images of the same product. Whatever a learned generator
scores above this baseline is what learning adds beyond copy-paste.

Why it is a ``Generator`` like the learned methods: it must go through the same
``defectforge train`` -> ``generate`` -> ``evaluate`` path so every report can show it beside the
others. "Training" is ``prepare_from_data``: it keeps each defect's bounding-box crop (image +
class-id mask, with a few pixels of context) as *buffers* of one module, so ``save_pretrained``
writes them to safetensors like any weights; there are no stages (``stages() == []``) and the
shared train loop writes the step-0 checkpoint.

Crops differ in size; they are stored padded to the largest crop (``images`` N,Hm,Wm,3,
``masks`` N,Hm,Wm, ``sizes`` N,2, ``product`` N, ``class_id`` N). Buffer shapes therefore come
from the data, so ``load_modules`` re-creates the buffers at the file's shapes, but still requires
exactly the expected keys: a missing or unexpected key is an error, as for every method.

Sampling (``requires_normal_images``): for each requested (product, defect) a crop of that type is
drawn, flipped, scaled and rotated with PIL (bilinear for the image, nearest for the mask, so class
ids stay ids), and pasted where its mask is set; the output mask is the pasted mask. Each sample
has its own ``numpy`` generator seeded from (seed, index), so a seed reproduces the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from safetensors import safe_open
from torch import nn

from defectforge.config import MethodConfigBase
from defectforge.methods.base import (
    CheckpointError,
    Conditions,
    GeneratedBatch,
    Generator,
    SamplingOptions,
    Stage,
    read_checkpoint_meta,
    verified_weight_file,
)
from defectforge.methods.registry import register

BANK = "bank"
BANK_KEYS = ("images", "masks", "sizes", "product", "class_id")


class CropPasteConfig(MethodConfigBase):
    """Paste augmentation ranges. Both presets use the defaults (there is nothing to size)."""

    name: Literal["crop-paste"] = "crop-paste"
    scale_min: float = Field(0.75, gt=0, description="smallest scale factor of a pasted crop")
    scale_max: float = Field(1.25, gt=0, description="largest scale factor of a pasted crop")
    max_rotation: float = Field(180.0, ge=0, le=180, description="rotation drawn from [-r, r] degrees")
    flip: bool = Field(True, description="random horizontal flip of the crop")
    context: int = Field(2, ge=0, le=32, description="pixels of context kept around each defect's bbox")

    @model_validator(mode="after")
    def _check(self) -> CropPasteConfig:
        if self.scale_min > self.scale_max:
            raise ValueError(f"method.scale_min={self.scale_min} exceeds method.scale_max={self.scale_max}")
        return self


class CropBank(nn.Module):
    """The kept crops, as buffers (so they are saved and moved with the module)."""

    def __init__(self) -> None:
        super().__init__()
        self.set(torch.zeros(0, 1, 1, 3, dtype=torch.uint8), torch.zeros(0, 1, 1, dtype=torch.uint8),
                 torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                 torch.zeros(0, dtype=torch.long))

    def set(self, images: torch.Tensor, masks: torch.Tensor, sizes: torch.Tensor, product: torch.Tensor,
            class_id: torch.Tensor) -> None:
        n = {len(images), len(masks), len(sizes), len(product), len(class_id)}
        if len(n) != 1:
            raise CheckpointError(f"crop bank tensors disagree on the number of crops: {sorted(n)}")
        for name, value in zip(BANK_KEYS, (images, masks, sizes, product, class_id)):
            self.register_buffer(name, value, persistent=True)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def defect_region(row: dict[str, Any], context: Any) -> tuple[int, np.ndarray] | None:
    """(class id, bool region) of a training row's labelled defect, or None for a defect-free row
    or an empty mask. A multi-class mask without its folder's class gives any defect pixel."""
    if row["defect"] == "good":
        return None
    own = context.class_id(row["product"], row["defect"])
    mask = np.asarray(row["mask"])
    region = mask == own
    if not region.any():
        region = mask > 0
    return (own, region) if region.any() else None


def _bbox(region: np.ndarray, context: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(region)
    h, w = region.shape
    return (max(int(ys.min()) - context, 0), min(int(ys.max()) + 1 + context, h),
            max(int(xs.min()) - context, 0), min(int(xs.max()) + 1 + context, w))


@register
class CropPaste(Generator):
    """Cut-and-paste of real defect crops onto normal images (see the module docstring)."""

    config_class = CropPasteConfig
    requires_normal_images = True

    def __init__(self, config: CropPasteConfig, context) -> None:
        super().__init__(config, context)
        self.bank = CropBank()

    # ------------------------------------------------------------------------- "training"
    def stages(self) -> list[Stage]:
        return []

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {}

    def saved_modules(self) -> dict[str, nn.Module]:
        return {BANK: self.bank}

    def training_step(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        raise RuntimeError("crop-paste has no training stages; it keeps crops in prepare_from_data")

    def prepare_from_data(self, rows: list[dict[str, Any]]) -> None:
        """Keep the bbox crop (+ context) of each labelled defect of the training rows."""
        crops = []
        for row in rows:
            if (found := defect_region(row, self.context)) is None:
                continue
            own, region = found
            y0, y1, x0, x1 = _bbox(region, self.config.context)
            crops.append((np.asarray(row["image"])[y0:y1, x0:x1],
                          np.where(region[y0:y1, x0:x1], own, 0).astype(np.uint8),
                          self.context.products.index(row["product"]), own))
        if not crops:
            raise ValueError("crop-paste: the training rows hold no defect with a non-empty mask")
        hm = max(c[0].shape[0] for c in crops)
        wm = max(c[0].shape[1] for c in crops)
        images = np.zeros((len(crops), hm, wm, 3), np.uint8)
        masks = np.zeros((len(crops), hm, wm), np.uint8)
        for i, (img, m, _, _) in enumerate(crops):
            images[i, : img.shape[0], : img.shape[1]] = img
            masks[i, : m.shape[0], : m.shape[1]] = m
        device = self.bank.images.device
        self.bank.set(torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device),
                      torch.tensor([c[0].shape[:2] for c in crops], dtype=torch.long, device=device),
                      torch.tensor([c[2] for c in crops], dtype=torch.long, device=device),
                      torch.tensor([c[3] for c in crops], dtype=torch.long, device=device))

    # ------------------------------------------------------------------------- checkpoints
    def load_modules(self, directory: str | Path, hashes: dict[str, str] | None = None) -> None:
        """Re-create the bank at the file's shapes; exactly ``BANK_KEYS`` must be present, and the
        file must match its sha256 in ``config.json`` (``verified_weight_file``)."""
        if hashes is None:
            hashes = read_checkpoint_meta(directory)["sha256"]
        path = verified_weight_file(Path(directory), BANK, hashes)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                missing, unexpected = sorted(set(BANK_KEYS) - keys), sorted(keys - set(BANK_KEYS))
                if missing or unexpected:
                    raise CheckpointError(f"{path}: weights do not match module {BANK!r}: missing keys {missing}, "
                                          f"unexpected keys {unexpected}")
                state = {k: f.get_tensor(k) for k in BANK_KEYS}
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors' own SafetensorError
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        expected = {"images": (torch.uint8, 4), "masks": (torch.uint8, 3), "sizes": (torch.long, 2),
                    "product": (torch.long, 1), "class_id": (torch.long, 1)}
        for key, (dtype, ndim) in expected.items():
            if state[key].dtype != dtype or state[key].ndim != ndim:
                raise CheckpointError(f"{path}: {key!r} must be a {ndim}-D {dtype} tensor, "
                                      f"got {state[key].ndim}-D {state[key].dtype}")
        self.bank.set(*(state[k] for k in BANK_KEYS))

    # --------------------------------------------------------------------------- sampling
    def _crop(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = (int(v) for v in self.bank.sizes[index])
        return (self.bank.images[index, :h, :w].cpu().numpy(), self.bank.masks[index, :h, :w].cpu().numpy())

    def _transform(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                   limit: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        img, msk = Image.fromarray(image, "RGB"), Image.fromarray(mask, "L")
        if cfg.flip and rng.random() < 0.5:
            img, msk = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), msk.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = rng.uniform(cfg.scale_min, cfg.scale_max)
        angle = rng.uniform(-cfg.max_rotation, cfg.max_rotation)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img, msk = img.resize(size, Image.Resampling.BILINEAR), msk.resize(size, Image.Resampling.NEAREST)
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
        msk = msk.rotate(angle, resample=Image.Resampling.NEAREST, expand=True)
        if max(img.size) > limit:  # a crop larger than the target image: shrink it to fit
            f = limit / max(img.size)
            size = (max(1, int(img.width * f)), max(1, int(img.height * f)))
            img, msk = img.resize(size, Image.Resampling.BILINEAR), msk.resize(size, Image.Resampling.NEAREST)
        return np.asarray(img), np.asarray(msk)

    @torch.no_grad()
    def sample(self, n: int, conditions: Conditions, seed: int,
               options: SamplingOptions | None = None) -> GeneratedBatch:
        """Paste one crop of each requested defect type onto each given normal image.

        ``options`` are checked (Crop-Paste has no sampling-time fields or guidance scales) and
        otherwise unused: pasting has no reverse process."""
        self.sampling_config(options or self.default_sampling)
        if n != len(conditions):
            raise ValueError(f"sample: n={n} but conditions has {len(conditions)} entries")
        if conditions.normal_image is None:
            raise ValueError("crop-paste pastes onto defect-free images: Conditions.normal_image (N,H,W,3 uint8) "
                             "is required (defectforge generate/evaluate take them from --data's train/good)")
        normal = np.asarray(conditions.normal_image)
        if normal.dtype != np.uint8 or normal.ndim != 4 or normal.shape[0] != n or normal.shape[-1] != 3:
            raise ValueError(f"Conditions.normal_image must be uint8 ({n},H,W,3), got {normal.dtype} {normal.shape}")
        if len(self.bank) == 0:
            raise RuntimeError("crop-paste has no crops: train it (prepare_from_data) or load a checkpoint")
        products = self.bank.product.cpu().numpy()
        class_ids = self.bank.class_id.cpu().numpy()
        images, masks = normal.copy(), np.zeros(normal.shape[:3], np.uint8)
        for i, (product, defect) in enumerate(zip(conditions.product, conditions.defect)):
            if product not in self.context.products:
                raise KeyError(f"unknown product {product!r}; this generator knows {list(self.context.products)}")
            own = self.context.class_id(product, defect)
            choices = np.flatnonzero((products == self.context.products.index(product)) & (class_ids == own))
            if len(choices) == 0:
                raise KeyError(f"crop-paste kept no crop of {product!r}/{defect!r} (none in its training rows)")
            rng = np.random.default_rng([int(seed), i])
            crop_img, crop_mask = self._transform(*self._crop(int(rng.choice(choices))), rng,
                                                  limit=min(normal.shape[1:3]))
            h, w = crop_mask.shape
            top = int(rng.integers(0, normal.shape[1] - h + 1))
            left = int(rng.integers(0, normal.shape[2] - w + 1))
            region = crop_mask > 0
            images[i, top:top + h, left:left + w][region] = crop_img[region]
            masks[i, top:top + h, left:left + w][region] = crop_mask[region]
        return GeneratedBatch(images=images, masks=masks, product=list(conditions.product),
                              defect=list(conditions.defect), extras={"method": "crop-paste"})
