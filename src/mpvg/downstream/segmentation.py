"""UperNet (Xiao et al. 2018) on the ViT-Adapter, and mIoU, as MMSegmentation computes them.

The heads follow MMSegmentation's ``UPerHead`` and ``FCNHead`` with the settings of
ViT-Adapter's ``upernet_deit_adapter_tiny_512_160k_ade20k.py`` (via ``upernet_r50.py``):

* decode head: PPM (pool scales 1, 2, 3, 6) on the stride-32 map, FPN laterals and 3x3
  convs at 512 channels, all levels upsampled to stride 4, concatenated, fused by a 3x3
  conv, dropout 0.1, 1x1 classifier; conv+BN+ReLU blocks without conv bias;
* auxiliary FCN head on the stride-16 map: one 3x3 conv (256), dropout 0.1, classifier;
  loss weight 0.4;
* loss: cross-entropy on logits upsampled (bilinear) to the label size, ignore index 255,
  averaged over ALL pixels (ignored ones count as 0), as MMSegmentation 0.20 did;
* inference: sliding 512x512 windows with stride 341, logits averaged, resized to the label.

mIoU: per-class intersection and union summed over the whole validation set, IoU =
intersection / union, mean over the classes with a non-empty union (NaN-mean), 0-100.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255


class ConvBNReLU(nn.Sequential):
    """MMCV ``ConvModule`` with BN: conv (no bias), BN, ReLU; Kaiming-normal (fan_out) init."""

    def __init__(self, cin: int, cout: int, kernel: int):
        conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if x.shape[-2:] == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _SegHead(nn.Module):
    """Dropout2d + 1x1 classifier (``cls_seg``), N(0, 0.01) init."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(_SegHead):
    """Pyramid pooling on the coarsest level + FPN fusion of all four levels."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels[-1], channels, 1))
                                  for s in pool_scales])
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        psp = [top] + [_resize(ppm(top), top.shape[-2:]) for ppm in self.ppm]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)] + [self.bottleneck(torch.cat(psp, 1))]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(l) for conv, l in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [_resize(o, outs[0].shape[-2:]) for o in outs]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, 1)))


class FCNHead(_SegHead):
    """Auxiliary head: ``num_convs`` 3x3 conv blocks on one level, then the classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2,
                 num_convs: int = 1, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.in_index = in_index
        self.convs = nn.Sequential(*[ConvBNReLU(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)])

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.convs(feats[self.in_index]))


class UperNetSegmentor(nn.Module):
    """Backbone (ViT-Adapter) + UPerHead (+ FCN auxiliary head in training).

    ``forward(images)`` returns decode-head logits at stride 4, ``forward(images, labels)``
    the losses (with the auxiliary head); :meth:`slide_inference` is the test-time forward.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 512, aux_channels: int = 256,
                 aux_weight: float = 0.4, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        in_ch = list(backbone.out_channels)
        self.num_classes = num_classes
        self.decode_head = UPerHead(in_ch, channels, num_classes, dropout=dropout)
        self.auxiliary_head = FCNHead(in_ch[2], aux_channels, num_classes, in_index=2, dropout=dropout) \
            if aux_weight > 0 else None
        self.aux_weight = aux_weight

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """Logits at stride 4; with ``labels`` (B, H, W) the losses ``{"loss_decode",
        "loss_aux"}`` instead (one forward for both, so DDP sees the training call)."""
        feats = self.backbone(images)
        if labels is None:
            return self.decode_head(feats)
        losses = {"loss_decode": seg_cross_entropy(self.decode_head(feats), labels)}
        if self.auxiliary_head is not None:
            losses["loss_aux"] = self.aux_weight * seg_cross_entropy(self.auxiliary_head(feats), labels)
        return losses

    @torch.no_grad()
    def slide_inference(self, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` of a normalised image from overlapping ``crop`` windows."""
        B, _, H, W = image.shape
        logits = image.new_zeros((B, self.num_classes, H, W))
        count = image.new_zeros((B, 1, H, W))
        h_grids = max(H - crop + stride - 1, 0) // stride + 1
        w_grids = max(W - crop + stride - 1, 0) // stride + 1
        for hi in range(h_grids):
            for wi in range(w_grids):
                y2, x2 = min(hi * stride + crop, H), min(wi * stride + crop, W)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                out = self(image[:, :, y1:y2, x1:x2])
                logits[:, :, y1:y2, x1:x2] += _resize(out, (y2 - y1, x2 - x1)).float()
                count[:, :, y1:y2, x1:x2] += 1
        return logits / count


def seg_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-pixel CE at the label resolution, summed and divided by all pixels (MMSeg 0.20)."""
    logits = _resize(logits, labels.shape[-2:])
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="none").mean()


# --------------------------------------------------------------------------------------
# mIoU
# --------------------------------------------------------------------------------------
def intersect_and_union(pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, ...]:
    """Per-class ``(intersection, union, pred area, label area)`` pixel counts of one image."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    label = torch.as_tensor(label).reshape(-1).long()
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    inter = pred[pred == label]
    a_inter = torch.bincount(inter, minlength=num_classes)[:num_classes]
    a_pred = torch.bincount(pred.clamp(0, num_classes), minlength=num_classes + 1)[:num_classes]
    a_label = torch.bincount(label.clamp(0, num_classes), minlength=num_classes + 1)[:num_classes]
    a_union = a_pred + a_label - a_inter
    return tuple(a.cpu().numpy().astype(np.int64) for a in (a_inter, a_union, a_pred, a_label))


class IoUAccumulator:
    """Sums :func:`intersect_and_union` over a dataset (and over ranks with ``all_reduce``)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.totals = np.zeros((4, num_classes), dtype=np.int64)

    def update(self, pred, label) -> None:
        self.totals += np.stack(intersect_and_union(pred, label, self.num_classes, self.ignore_index))

    def all_reduce(self) -> None:
        from mpvg.run.distributed import all_reduce

        t = torch.from_numpy(self.totals.copy())
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        self.totals = all_reduce(t).cpu().numpy()

    def compute(self) -> dict[str, float]:
        return miou_from_totals(self.totals)


def miou_from_totals(totals: np.ndarray) -> dict[str, float]:
    """``{"miou", "macc", "aacc"}`` (0-100) from summed ``(intersect, union, pred, label)``."""
    inter, union, _, label = (totals[i].astype(np.float64) for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(label > 0, inter / label, np.nan)
    valid = ~np.isnan(iou)
    return {"miou": float(100 * np.nanmean(iou)) if valid.any() else 0.0,
            "macc": float(100 * np.nanmean(acc)) if (~np.isnan(acc)).any() else 0.0,
            "aacc": float(100 * inter.sum() / label.sum()) if label.sum() > 0 else 0.0}


def mean_iou(preds: Sequence, labels: Sequence, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float:
    """mIoU (0-100) of paired prediction/label maps, accumulated over the whole set."""
    acc = IoUAccumulator(num_classes, ignore_index)
    for p, l in zip(preds, labels):
        acc.update(p, l)
    return acc.compute()["miou"]


def build_upernet(backbone: nn.Module, num_classes: int, channels: int = 512, aux_channels: int = 256,
                  aux_weight: float = 0.4) -> UperNetSegmentor:
    return UperNetSegmentor(backbone, num_classes, channels, aux_channels, aux_weight)


def predict_label(model: UperNetSegmentor, image: torch.Tensor, out_size, crop: Optional[int], stride: int) -> torch.Tensor:
    """Class map at ``out_size`` for one normalised image batch: slide (``crop``) or whole."""
    logits = model.slide_inference(image, crop, stride) if crop else model(image)
    return _resize(logits.float(), tuple(out_size)).argmax(1)
