"""Mask R-CNN (torchvision) with the ViT-Adapter + FPN as its backbone, and COCO box/mask AP.

torchvision supplies the detector (RPN, RoI heads, losses, RoIAlign/NMS ops, FPN); the
settings follow MMDetection's ``mask_rcnn_r50_fpn.py`` that ViT-Adapter's config inherits:

* FPN 256 channels, 5 outputs (the 5th a stride-2 max-pool of the 4th), Xavier init;
* anchors 32..512 (scale 8 x strides 4..64), ratios 0.5/1/2;
* RPN: IoU 0.7/0.3, 256 samples (half positive), 2000 boxes per level before NMS(0.7) and
  1000 after in training, 1000/1000 in testing;
* RoI heads: IoU 0.5, 512 samples (a quarter positive), box head 2 x FC 1024, mask head
  4 x conv 256 + deconv, RoIAlign 7 (boxes) / 14 (masks) with ``aligned=True`` and adaptive
  sampling (MMCV's defaults, :class:`AlignedMultiScaleRoIAlign`), RoI-to-level mapping
  ``floor(log2(sqrt(wh) / 56))`` (same as torchvision's);
* test: score > 0.05, NMS 0.5, 100 detections, masks binarised at 0.5.

What torchvision does differently (losses, mask targets) is in docs/downstream.md.
Nothing is downloaded: the model is built with no torchvision weights.
"""
from __future__ import annotations

import contextlib
import io
import math
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class AdapterFPN(nn.Module):
    """ViT-Adapter pyramid (strides 4-32) + FPN: the backbone torchvision's Mask R-CNN expects
    (``out_channels`` and an ordered dict of maps ``"0".."3", "pool"``)."""

    def __init__(self, adapter: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body = adapter
        self.fpn = FeaturePyramidNetwork(list(adapter.out_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        for m in self.fpn.modules():  # MMDetection's FPN: Xavier-uniform convs, zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """RoIAlign over FPN levels with ``aligned=True`` and ``sampling_ratio=0`` (MMCV's
    ``RoIAlign`` defaults used by MMDetection), fixed strides, MMDetection's level mapping.

    A ``MultiScaleRoIAlign`` (torchvision's Mask R-CNN checks the type) with its own forward.
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int, strides: Sequence[int] = (4, 8, 16, 32),
                 sampling_ratio: int = 0, finest_scale: int = 56):
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        self.output_size = (output_size, output_size)
        self.strides = list(strides)
        self.finest_scale = finest_scale

    def forward(self, x: dict, boxes: list[torch.Tensor], image_shapes: list) -> torch.Tensor:
        feats = [x[n] for n in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0)
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(feats) - 1).long()
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.where(levels == lvl)[0]
            if idx.numel() == 0:
                continue
            pooled = roi_align(feat, rois[idx].to(feat.dtype), self.output_size, spatial_scale=1.0 / stride,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out


def _init_heads_like_mmdet(model: nn.Module) -> None:
    """MMDetection's head initialisation: shared FCs Xavier-uniform, classifier N(0, 0.01),
    box regressor N(0, 0.001); RPN and mask head inits already agree with torchvision's."""
    head = model.roi_heads.box_head
    for fc in (head.fc6, head.fc7):
        nn.init.xavier_uniform_(fc.weight)
        nn.init.zeros_(fc.bias)
    pred = model.roi_heads.box_predictor
    nn.init.normal_(pred.cls_score.weight, std=0.01)
    nn.init.normal_(pred.bbox_pred.weight, std=0.001)
    nn.init.zeros_(pred.cls_score.bias)
    nn.init.zeros_(pred.bbox_pred.bias)


def build_mask_rcnn(adapter: nn.Module, num_classes: int, min_size: int = 800, max_size: int = 1333,
                    fpn_channels: int = 256, box_fc_dim: int = 1024, mask_head_dim: int = 256) -> nn.Module:
    """torchvision ``MaskRCNN`` around ``adapter`` for ``num_classes`` foreground classes.

    ``min_size``/``max_size`` are the test resize (short side 800, long side <= 1333); in
    training the dataset's transform has already sized the images and no resize happens.
    ``fpn_channels``, ``box_fc_dim``, ``mask_head_dim`` are MMDetection's 256/1024/256; the
    tiny scale shrinks them so a CPU step takes a second.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    backbone = AdapterFPN(adapter, fpn_channels)
    model = MaskRCNN(
        backbone, num_classes=None, min_size=min_size, max_size=max_size,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, _skip_resize=True,
        rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
        box_roi_pool=AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 7),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_fc_dim),
        box_predictor=FastRCNNPredictor(box_fc_dim, num_classes + 1),
        mask_roi_pool=AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 14),
        mask_head=MaskRCNNHeads(fpn_channels, [mask_head_dim] * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_dim, mask_head_dim, num_classes + 1),
        box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100)
    _init_heads_like_mmdet(model)
    return model


# --------------------------------------------------------------------------------------
# COCO evaluation
# --------------------------------------------------------------------------------------
def encode_mask(mask: np.ndarray) -> dict:
    """A binary ``(H, W)`` mask as COCO compressed RLE (JSON-ready counts)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def to_coco_results(image_id: int, output: dict, label_to_cat: dict, mask_threshold: float = 0.5) -> list[dict]:
    """One image's detections (``boxes`` xyxy, ``scores``, ``labels``, optional ``masks``
    ``(N, 1, H, W)`` probabilities or ``(N, H, W)`` binary) as COCO result entries."""
    boxes = output["boxes"].detach().cpu().float()
    scores = output["scores"].detach().cpu().float()
    labels = output["labels"].detach().cpu()
    masks = output.get("masks")
    if masks is not None:
        masks = masks.detach().cpu()
        if masks.ndim == 4:
            masks = masks[:, 0]
        masks = (masks > mask_threshold if masks.is_floating_point() else masks > 0).numpy()
    results = []
    for i in range(len(boxes)):
        x1, y1, x2, y2 = boxes[i].tolist()
        entry = {"image_id": int(image_id), "category_id": int(label_to_cat[int(labels[i])]),
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[i])}
        if masks is not None:
            entry["segmentation"] = encode_mask(masks[i])
        results.append(entry)
    return results


def coco_evaluate(coco_gt, results: list[dict], image_ids: Optional[Iterable[int]] = None,
                  iou_types: Sequence[str] = ("bbox", "segm")) -> dict[str, float]:
    """COCO AP (IoU 0.50:0.95, all areas, 100 detections) per IoU type, 0-100 scale, as
    ``{"bbox_ap": .., "segm_ap": ..}``; 0.0 when there are no detections."""
    from pycocotools.cocoeval import COCOeval

    metrics = {}
    for iou_type in iou_types:
        key = f"{iou_type}_ap"
        # copies: loadRes writes into the entries; bbox AP is computed without the masks
        entries = ([{k: v for k, v in r.items() if k != "segmentation"} for r in results] if iou_type == "bbox"
                   else [dict(r) for r in results if "segmentation" in r])
        if not entries:
            metrics[key] = 0.0
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(entries)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(set(int(i) for i in image_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        ap = float(ev.stats[0])
        metrics[key] = 0.0 if math.isnan(ap) or ap < 0 else 100.0 * ap
    return metrics
