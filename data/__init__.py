"""Image data for tokenizer training and evaluation.

Every datamodule here yields batches ``(images, labels)``: images float32 in [-1, 1],
shape (B, 3, R, R); labels int64, shape (B,). A label of ``PADDING_LABEL`` (-1) marks a
padding sample in validation batches (see ``data.common``); ignore those rows.

- ``data.webdataset_module.WebDatasetDataModule``: ImageNet-style webdataset shards.
- ``data.demo.DemoDataModule``: scikit-image's sample photographs, cut into crops and
  written once into shards, then read by the webdataset datamodule (the default).
- ``data.imagefolder.ImageFolderDataModule``: root/train/<class>/*, root/val/<class>/*.
- ``data.synthetic.SyntheticDataModule``: procedural images in memory, for tests.
- ``python -m data.shards SRC OUT``: writes webdataset shards from an image folder.
"""
