"""Downstream tasks of the paper (Tables 3-4, 8-9): COCO detection with Mask R-CNN and ADE20K
segmentation with UperNet, both on a ViT-Adapter-Ti whose DeiT-Ti carries a PE method.

* :mod:`.deform_attn` multi-scale deformable attention (pure PyTorch);
* :mod:`.adapter` the ViT-Adapter around the package's DeiT (layer-wise PE included);
* :mod:`.detection` torchvision Mask R-CNN with the adapter + FPN, COCO AP;
* :mod:`.segmentation` UperNet head, mIoU;
* :mod:`.engine` training / evaluation loops; :mod:`.commands` ``mpvg detect|segment``.

See docs/downstream.md for what differs from the MMDetection / MMSegmentation setups.
"""
