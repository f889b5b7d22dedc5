"""Fine-tuning: the backbone's last blocks and the multi-object head trained together, from images.

The frozen pipeline computes features once and trains heads on them. Here every batch goes
through the backbone, so the images can be augmented, and the last `unfreeze` units of the
backbone learn too. The loop is `loop.fit`'s (`ImageBatches` gives it batches of images
instead of cached features); the model is `FineTuner`, which starts from the head trained on the
frozen features, whatever its kind (its targets and objective are the kind's, as in training).

Augmentation (torchvision.transforms.v2, which moves the boxes with the pixels; VOC's boxes,
1-based inclusive pixel indices, mirrored as the devkit counts them): horizontal flip,
scale and shift jitter (an affine map; areas moved in from outside the image are black), colour
jitter, then boxes clamped to the image and those left smaller than a pixel dropped with their
labels. It is applied to the S x S image after the image mode, so it costs little.

The backbone's BatchNorm layers keep their ImageNet statistics (eval mode) even when their
weights train: batches of 16 images are too small to estimate them (as detectron2's FrozenBN).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline_lib.base.distributed import ONE_PROCESS, Ranks
from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import EvalParams, FinetuneParams, Params, by_name
from pipeline_lib.boxes.detection import Filtering
from pipeline_lib.boxes.geometry import ImageSpec, decode_boxes, encode_boxes, pixel_fraction
from pipeline_lib.data.tables import Prepared, read_prepared
from pipeline_lib.features.backbones import (
    Backbone,
    backbone_units,
    is_unit_of,
    load_backbone,
    pack_levels,
)
from pipeline_lib.features.devices import pick_device, pick_workers
from pipeline_lib.features.images import check_stackable, load_image_tensor
from pipeline_lib.measures.metrics import OVERLAP_OF_SOURCE, VocSummary, voc_summary
from pipeline_lib.models.checkpoints import Checkpoint, check_classes, load_checkpoint
from pipeline_lib.models.headkinds import Targets, head_kind
from pipeline_lib.models.losses import Objective
from pipeline_lib.models.modelcard import ModelCard
from pipeline_lib.models.targets import Objects, ground_truth, image_objects, inclusive_pixels
from pipeline_lib.training.loop import FitResult, TrainConfig, best_epoch_stats
from pipeline_lib.training.tasks import SPLITS, loss_weights, train_config


@dataclass(frozen=True)
class Augmentation:
    """Random transforms of an image with its boxes (torchvision.transforms.v2): `flip` (left to
    right), then `jitter` (scale and shift, colour, boxes clamped and the empty ones dropped)."""

    flip: v2.RandomHorizontalFlip
    jitter: v2.Compose


def augmentation(
    hflip: float = 0.5, scale_jitter: float = 0.0, translate: float = 0.0, color_jitter: float = 0.0
) -> Augmentation:
    """`hflip` is a probability, the image is scaled by a factor in [1 - scale_jitter,
    1 + scale_jitter] and shifted by up to `translate` of its size, brightness, contrast and
    saturation are multiplied by factors in [1 - color_jitter, 1 + color_jitter]."""
    shift, scale = (translate, translate), (1 - scale_jitter, 1 + scale_jitter)
    jitter = v2.Compose(
        [
            v2.RandomAffine(degrees=0, translate=shift, scale=scale),
            v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0),
        ]
    )
    return Augmentation(v2.RandomHorizontalFlip(hflip), jitter)


def augment(
    transform: Augmentation,
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    pixel: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply `transform` to a uint8 (3, H, W) image and its (K, 4) xyxy pixel boxes and (K,)
    labels -> (image, boxes float64, labels), boxes that left the image dropped.

    torchvision mirrors continuous coordinates (x -> W - x). Boxes in 1-based inclusive pixel
    indices (VOC's) mirror to W + pixel - x, `pixel` being the width one index spans in this
    image (`geometry.pixel_fraction` x W; 0 for continuous boxes): their left edges are moved to
    the continuous ones for the flip, and back. Scaling and shifting move both alike."""
    height, width = image.shape[-2:]
    edge = boxes.new_tensor([pixel, 0, 0, 0]).float()
    boxes = tv_tensors.BoundingBoxes(
        boxes.float() - edge, format="XYXY", canvas_size=(height, width)
    )
    image, target = transform.flip(tv_tensors.Image(image), {"boxes": boxes, "labels": labels})
    target["boxes"] = tv_tensors.wrap(target["boxes"] + edge, like=target["boxes"])
    image, target = transform.jitter(image, target)
    boxes = target["boxes"].as_subclass(torch.Tensor).double()
    return image.as_subclass(torch.Tensor), boxes, target["labels"]


class ObjectImages(Dataset):
    """Images after the image mode with their objects, augmented when `transform` is given.

    Items are (uint8 (3, S, S) image, fraction boxes (K, 4) float64, labels (K,)); `objects`
    holds (fraction boxes, labels) per image (`targets.image_objects`), `pixels` the width of
    one of each image's pixel indices in the S x S image (`augment`; none: continuous boxes).
    `HeadTargets` makes a batch's targets from them, as the head's kind makes them.
    """

    def __init__(
        self,
        paths: list[Path],
        objects: list[Objects],
        spec: ImageSpec,
        transform: Augmentation | None = None,
        pixels: list[float] | None = None,
    ):
        self.paths, self.objects, self.spec, self.transform = paths, objects, spec, transform
        self.pixels = pixels or [0.0] * len(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spec = self.spec
        image = load_image_tensor(self.paths[index], spec.mode, spec.size)
        fractions, labels = self.objects[index]
        if self.transform is not None:
            boxes = decode_boxes(fractions, spec.size, spec.size)
            pixel = self.pixels[index]
            image, boxes, labels = augment(self.transform, image, boxes, labels, pixel)
            fractions = encode_boxes(boxes, spec.size, spec.size)
        return image, fractions, labels


@dataclass(frozen=True)
class HeadTargets:
    """A DataLoader's collate function: ObjectImages items -> (images (B, 3, S, S) uint8, then
    the batch's targets as the card's head kind makes them (`headkinds.HeadKind.targets`))."""

    card: ModelCard
    targets: Targets

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple:
        images = torch.stack([image for image, _, _ in items])
        return images, *self.targets(self.card, [(f, labels) for _, f, labels in items])


@dataclass
class ImageBatches:
    """`loop.Dataset`'s interface over a DataLoader of ObjectImages, so that `loop.fit`
    runs the fine-tuning too. The loader shuffles (or not) by itself: `order` is ignored; a
    DistributedSampler is told each new epoch. Its length: the images this process sees."""

    loader: DataLoader
    epoch: int = 0

    def __len__(self) -> int:
        return len(self.loader.sampler)

    @property
    def images(self) -> int:
        """The split's images (over all processes)."""
        return len(self.loader.dataset)

    def batches(self, batch_size: int, order=None, device=None) -> Iterator:
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for images, *targets in self.loader:
            yield images.to(device), tuple(t.to(device) for t in targets)


class FineTuner(nn.Module):
    """uint8 (B, 3, S, S) images -> the head's outputs, through the backbone (both levels,
    packed as extraction packs them, when the backbone has a fine one).

    The backbone's first units run without gradients; its last `unfreeze` units ("all": every
    one) and the head train. The modules are the backbone's and the head's own, so after training
    `backbone.module.state_dict()` and `head.state_dict()` hold the new weights.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, unfreeze: int | str):
        super().__init__()
        units = backbone_units(backbone.module)
        n = len(units) if unfreeze == "all" else min(int(unfreeze), len(units))
        self.frozen_units = len(units) - n
        self.names = [name for name, _ in units]
        self.units = nn.ModuleList(unit for _, unit in units)
        self.trainable_units = self.names[self.frozen_units :]
        for k, unit in enumerate(self.units):
            unit.requires_grad_(k >= self.frozen_units)
        self.fine_layer = backbone.fine_layer
        self.head = head
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1) * 255)

    def train(self, mode: bool = True) -> FineTuner:
        super().train(mode)
        for k, unit in enumerate(self.units):  # frozen units and the backbone's BatchNorms: eval
            if k < self.frozen_units:
                unit.eval()
            for module in unit.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (images.float() - self.mean) / self.std  # as devices.prepare_model normalises
        fine = None
        for k, (name, unit) in enumerate(zip(self.names, self.units, strict=True)):
            with torch.set_grad_enabled(torch.is_grad_enabled() and k >= self.frozen_units):
                x = unit(x)
            if self.fine_layer and is_unit_of(name, self.fine_layer):
                fine = x  # as backbones.run_levels taps it
        return self.head(x if fine is None else pack_levels(x, fine))


def training_device(device: str, ranks: Ranks = ONE_PROCESS) -> torch.device:
    """finetune.device resolved (`devices.pick_device`); under torchrun, this process's own GPU
    (cuda:LOCAL_RANK), or on CPU the cores shared by the machine's processes."""
    chosen = pick_device(device, "finetune.device")
    if chosen.type == "cuda" and ranks.world > 1:
        chosen = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(chosen)
    elif chosen.type == "cpu":
        ranks.share_cpu()
    return chosen


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def head_outputs(model: nn.Module, loader: DataLoader, device=None) -> tuple[torch.Tensor, ...]:
    """Run `model` in eval mode over a loader of ObjectImages (in its order); the head's outputs
    concatenated on the CPU."""
    model.eval()
    parts = [tuple(t.cpu() for t in model(images.to(device))) for images, *_ in loader]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def read_frozen(model: Path, prepared_dir: Path) -> tuple[Checkpoint, Prepared]:
    """The frozen-feature multi-object model in `model`, of any head kind, one level or two
    (checked to be rebuildable from its backbone's published weights) and the prepared
    tables."""
    checkpoint = load_checkpoint(model)
    card = checkpoint.card
    if card.kind != "multi":
        raise PipelineError(
            f"{model}: a {card.kind}-object head; fine-tuning takes multi-object ones"
        )
    check_stackable(card.image.mode)
    if card.backbone["weights"] != "imagenet":
        raise PipelineError(
            f"{model}: trained on a randomly initialised {card.backbone['name']}, which cannot be "
            "rebuilt to fine-tune; use backbone.weights: imagenet"
        )
    prepared = read_prepared(prepared_dir)
    check_classes(prepared, checkpoint, model)
    return checkpoint, prepared


def image_loader(
    ft: FinetuneParams,
    checkpoint: Checkpoint,
    prepared: Prepared,
    split: str,
    device,
    ranks: Ranks = ONE_PROCESS,
) -> DataLoader:
    """A DataLoader of ObjectImages for `split` (augmented for train, shuffled with ft.seed)
    with the image spec of `checkpoint`, its batches' targets as the head's kind makes them.
    Under torchrun each rank loads its part (DistributedSampler: reshuffled each epoch from
    ft.seed, padded to equal parts)."""
    card = checkpoint.card
    rows = prepared.images[prepared.images["split"] == split]
    transform = None
    if split == "train":
        transform = augmentation(ft.hflip, ft.scale_jitter, ft.translate, ft.color_jitter)
    dataset_dir = Path(prepared.info["dataset_dir"])
    spec = card.image
    objects = image_objects(prepared, rows["image_id"].tolist(), spec)
    pixels = None
    if inclusive_pixels(prepared):
        pixels = [pixel_fraction(w, spec.mode, spec.size) * spec.size for w in rows["width"]]
    paths = [dataset_dir / p for p in rows["path"]]
    data = ObjectImages(paths, objects, spec, transform, pixels)
    sampler = None
    if ranks.world > 1:
        shuffle = split == "train"
        sampler = DistributedSampler(data, ranks.world, ranks.rank, shuffle=shuffle, seed=ft.seed)
    return DataLoader(
        data,
        batch_size=ft.batch_size,
        shuffle=split == "train" and sampler is None,
        sampler=sampler,
        collate_fn=HeadTargets(card, head_kind(card).targets),
        num_workers=pick_workers(ft.workers, device),
        generator=torch.Generator().manual_seed(ft.seed),
        pin_memory=device.type == "cuda",
    )


def rebuild(checkpoint: Checkpoint, unfreeze: int | str = 0) -> tuple[Backbone, FineTuner]:
    """The checkpoint's backbone (both levels, if it has two; with its own weights if
    fine-tuned) and head as a FineTuner."""
    spec = checkpoint.card.backbone
    backbone = load_backbone(spec["name"], spec["layer"], spec["weights"], spec.get("fine_layer"))
    if checkpoint.backbone_state is not None:
        backbone.module.load_state_dict(checkpoint.backbone_state)
    return backbone, FineTuner(backbone, checkpoint.head, unfreeze)


def finetuned_from(tuned: Checkpoint, frozen: Checkpoint) -> bool:
    """Whether `tuned` is a fine-tuned model of `frozen`: it holds backbone weights, and the same
    backbone (its precision aside: fine-tuning runs float32 whatever extract ran)."""
    same = [{k: v for k, v in c.card.backbone.items() if k != "precision"} for c in (tuned, frozen)]
    return tuned.backbone_state is not None and same[0] == same[1]


def compare_models(
    models: dict[str, Checkpoint], prepared: Prepared, loader: DataLoader, ev: EvalParams, device
) -> dict[str, VocSummary]:
    """VOC AP on the images of `loader` (the val split, in table order) of each model, the
    backbone run in float32 for all (the frozen model's own features may be bfloat16 ones)."""
    val = prepared.images[prepared.images["split"] == "val"]
    sizes = [(int(w), int(h)) for w, h in zip(val["width"], val["height"], strict=True)]
    truth = ground_truth(prepared.objects, val["image_id"].tolist())
    overlap = OVERLAP_OF_SOURCE[prepared.info["source"]]
    keep = by_name(Filtering, ev)
    results = {}
    for name, checkpoint in models.items():
        _, model = rebuild(checkpoint)
        outputs = head_outputs(model.to(device), loader, device)
        found = checkpoint.head.detections(outputs, sizes, checkpoint.card.image, keep)
        results[name] = voc_summary(found, truth, prepared.classes, ev.iou_threshold, overlap)
    return results


@dataclass
class FinetuneJob:
    """Everything `loop.fit` needs to fine-tune a frozen-feature grid model."""

    backbone: Backbone
    model: FineTuner
    train: ImageBatches
    val: ImageBatches
    objective: Objective
    config: TrainConfig
    parallel: nn.Module | None = None  # under torchrun: `model` in DistributedDataParallel

    @property
    def trained(self) -> nn.Module:
        """What `loop.fit` trains: the DDP wrapper under torchrun, else the model."""
        return self.model if self.parallel is None else self.parallel

    def describe(self) -> str:
        units = ", ".join(self.model.trainable_units) or "no backbone unit"
        processes = ""
        if self.parallel is not None:
            processes = f" in {torch.distributed.get_world_size()} processes"
        return (
            f"training {units} and the head ({trainable_parameters(self.model):,} parameters) "
            f"on {self.train.images} images, {self.config.device}{processes}"
        )

    def metrics(self, result: FitResult) -> dict:
        """The fine-tuning stage's metrics: the epoch kept (finetune.monitor: lowest val loss, or
        the last) and its val measures."""
        epochs = self.config.epochs
        return {
            "enabled": True,
            "images": {"train": self.train.images, "val": self.val.images},
            "best": {"epoch": result.best_epoch, **best_epoch_stats(result)},
            "epochs": epochs,
            "seconds_per_epoch": round(result.seconds / epochs, 1),
            "trainable_units": self.model.trainable_units,
            "trainable_parameters": trainable_parameters(self.model),
            "device": self.config.device,
        }

    def card(self, frozen: ModelCard, result: FitResult) -> ModelCard:
        """The fine-tuned model's card: the frozen model's, fed float32 features of a float32
        backbone (fine-tuning trains and evaluates it in float32)."""
        summary = {
            "best_epoch": result.best_epoch,
            "monitor": self.config.monitor,
            "epochs": self.config.epochs,
            "trainable_units": self.model.trainable_units,
        }
        backbone = frozen.backbone | {"precision": "float32"}
        return replace(frozen, feature_dtype="float32", backbone=backbone, finetuned=summary)


def finetune_job(
    checkpoint: Checkpoint,
    prepared: Prepared,
    params: Params,
    device: torch.device,
    ranks: Ranks = ONE_PROCESS,
) -> FinetuneJob:
    """The backbone's last finetune.unfreeze units and the head of `checkpoint`, with loaders of
    the train and val images; the loss weights of params train.*. Under torchrun (`ranks` of a
    world > 1) the model trains in DistributedDataParallel: gradients averaged over the ranks,
    each rank on its part of the images."""
    ft = params.finetune
    loaders = {
        split: image_loader(ft, checkpoint, prepared, split, device, ranks) for split in SPLITS
    }
    backbone, model = rebuild(checkpoint, ft.unfreeze)
    model.to(device)
    parallel = None
    if ranks.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        parallel = DistributedDataParallel(model, device_ids=ids)
    objective = model.head.objective(loss_weights(params.train))
    config = train_config(ft, str(device))
    train, val = (ImageBatches(loaders[split]) for split in SPLITS)
    return FinetuneJob(backbone, model, train, val, objective, config, parallel)


def comparison_metrics(results: dict[str, VocSummary], images: int, ev: EvalParams, overlap: str):
    """evaluate_finetune's metrics: mAP of the frozen-feature and the fine-tuned model and the
    gain (per-class APs are drawn, not listed: figures/per_class_ap_*.png)."""
    before, after = results["frozen"].map(), results["finetuned"].map()
    metrics = {
        "enabled": True,
        "images": images,
        "iou_threshold": ev.iou_threshold,
        "overlap": overlap,
        "map_frozen": round(before, 4),
        "map": round(after, 4),
        "gain": round(after - before, 4),
    }
    return metrics
