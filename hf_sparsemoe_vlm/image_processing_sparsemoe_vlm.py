# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Image processor for SparseMoE-VLM, on Transformers' PIL backend (no torchvision needed)."""

import os
from typing import Any

import huggingface_hub.constants
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    PILImageResampling,
    load_image,
)
from transformers.processing_utils import ImagesKwargs, Unpack


# Normalisation each vision tower family was trained with.
TOWER_MEAN_STD = {
    "siglip_vision_model": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
    "vit": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "dinov2": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "dinov2_with_registers": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "convnext": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "resnet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
}

ACCEPTED_IMAGE_TYPES = "PIL.Image.Image, numpy.ndarray, torch.Tensor or a path to an image file"


def _describe(image: Any) -> str:
    if isinstance(image, PIL.Image.Image):
        return f"PIL image mode={image.mode} size={image.size}"
    if hasattr(image, "shape") and hasattr(image, "dtype"):
        return f"{type(image).__name__} shape={tuple(image.shape)} dtype={image.dtype}"
    return type(image).__name__


def load_image_file(path: str) -> PIL.Image.Image:
    """Open an image file (or URL) fully with PIL, upright per its EXIF orientation. Raises `FileNotFoundError` for a
    missing path and `ValueError` naming the path for an unreadable or truncated file, or for a URL in offline
    mode."""
    if path.startswith(("http://", "https://")):
        if huggingface_hub.constants.is_offline_mode():
            raise ValueError(
                f"Cannot fetch image {path!r}: offline mode (HF_HUB_OFFLINE=1) forbids network access. Download the "
                "image and pass a PIL image or a local file path instead, or unset HF_HUB_OFFLINE."
            )
        return load_image(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path!r}")
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later inside a batch
            return PIL.ImageOps.exif_transpose(image)
    except (OSError, PIL.Image.DecompressionBombError, SyntaxError) as error:
        raise ValueError(f"Cannot read image file {path!r}: {error}") from error


# PIL modes with more than 8 bits per pixel: scaled to 8 bits rather than clipped at 255 by PIL's conversion.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def _pil_to_array(image: PIL.Image.Image) -> np.ndarray:
    """uint8 (H, W, C) array of a PIL image's own channels (no colour conversion)."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        maximum = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        if image.mode == "F" and values.max() <= 1.0:
            maximum = 1.0
        array = np.clip(np.round(values / maximum * 255.0), 0, 255).astype(np.uint8)
    else:
        array = np.asarray(image)
        if array.dtype == np.bool_:  # mode "1"
            array = array.astype(np.uint8) * 255
    return array[..., None] if array.ndim == 2 else array


def _array_to_uint8(array: np.ndarray, input_data_format: ChannelDimension | str | None) -> np.ndarray:
    """uint8 (H, W, C) from a (H, W), (H, W, C) or (C, H, W) array with C in {1, 2, 3, 4}; channels are kept.

    uint8 arrays are 0-255; float arrays must be in [0, 1]; other integer arrays are scaled by their dtype range.
    """
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected a 2D or 3D image array, got {array.ndim} dimensions")
    if input_data_format is None:  # like Transformers: a leading axis of 1-4 channels wins
        if array.shape[0] in (1, 2, 3, 4):
            input_data_format = ChannelDimension.FIRST
        elif array.shape[-1] in (1, 2, 3, 4):
            input_data_format = ChannelDimension.LAST
        else:
            raise ValueError(f"cannot find the channel axis (1, 2, 3 or 4 channels) in shape {array.shape}")
    if input_data_format in (ChannelDimension.FIRST, "channels_first"):
        array = np.moveaxis(array, 0, -1)
    if array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"cannot find the channel axis (1, 2, 3 or 4 channels) in shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has zero size: shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image contains NaN or infinite values")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"float images must hold values in [0, 1], got [{array.min():.3g}, {array.max():.3g}]; "
                "pass uint8 arrays for 0-255 data"
            )
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"unsupported image dtype {array.dtype}")
        info = np.iinfo(array.dtype)
        array = np.round((array.astype(np.float64) - info.min) / (info.max - info.min) * 255.0).astype(np.uint8)
    return array


def _check_mean_std(images: list[np.ndarray], image_mean: Any, image_std: Any, do_convert_rgb: bool | None) -> None:
    """Transformers' `normalize` only says the lengths differ; say which setting to change."""
    for index, image in enumerate(images):
        for name, value in (("image_mean", image_mean), ("image_std", image_std)):
            if isinstance(value, (list, tuple)) and len(value) != image.shape[0]:
                fix = (
                    "`do_convert_rgb=True` makes every image RGB: give 3 values, or set `do_convert_rgb=False` to "
                    "keep each image's own channels" if do_convert_rgb else
                    "`do_convert_rgb=False` keeps each image's own channels: give one value per channel, or set "
                    "`do_convert_rgb=True` to convert images to RGB (3 channels)"
                )
                raise ValueError(f"`{name}` has {len(value)} values but image {index} has {image.shape[0]} "
                                 f"channels: {fix}.")


class SparseMoEVLMImageProcessor(PilBackend):
    r"""
    Resizes images to the vision tower's square input size, rescales them to [0, 1] and normalises them with the
    tower's mean and std; returns `pixel_values` of shape `(num_images, 3, size, size)`. With `do_convert_rgb=False`
    images keep their own channels (e.g. 4 for RGBA) and `image_mean` / `image_std` need one value per channel.

    Accepts PIL images of any mode (RGB, L, LA, P, RGBA, CMYK, I;16, ...; with `do_convert_rgb=True`, the default,
    transparency is composited on white), numpy arrays and torch tensors (HWC or CHW; uint8 in 0-255 or float in
    [0, 1]), paths to image files, and lists / nested lists of these. Bad images raise an error naming the image.

    Build the one matching a model config with [`SparseMoEVLMImageProcessor.from_model_config`].
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def __init__(self, **kwargs: Unpack[ImagesKwargs]):
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "SparseMoEVLMImageProcessor":
        """The image processor for a `SparseMoEVLMConfig`: its `image_size` and its vision tower's mean/std."""
        mean, std = TOWER_MEAN_STD.get(config.vision_config.model_type, (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD))
        defaults = {"size": {"height": config.image_size, "width": config.image_size},
                    "image_mean": list(mean), "image_std": list(std)}
        return cls(**{**defaults, **kwargs})

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Load paths (and URLs) with PIL; pass images through; anything else is a `TypeError`."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            return load_image_file(os.fspath(image_url_or_urls))
        if isinstance(image_url_or_urls, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            if getattr(image_url_or_urls, "ndim", 3) == 2:  # one grayscale (H, W) image: give it a channel axis
                return image_url_or_urls[..., None]
            return image_url_or_urls
        raise TypeError(f"`images` must be {ACCEPTED_IMAGE_TYPES}, or a list of them; got {_describe(image_url_or_urls)}.")

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Any accepted image -> uint8 channels-first array: RGB with `do_convert_rgb`, else the image's channels."""
        if isinstance(image, PIL.Image.Image):
            if image.width == 0 or image.height == 0:
                raise ValueError(f"image has zero size: {image.size}")
            if do_convert_rgb and image.mode not in HIGH_BIT_DEPTH_MODES:
                # Convert while the PIL mode is known (palette, CMYK, transparency), as `PilBackend` does.
                array = convert_to_rgb(image, return_numpy=True)
            else:
                array = _pil_to_array(image)
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
            array = _array_to_uint8(array, input_data_format)
        else:
            raise TypeError(f"expected {ACCEPTED_IMAGE_TYPES}, got {_describe(image)}")
        if do_convert_rgb and array.shape[-1] != 3:
            if array.shape[-1] == 2:  # gray + alpha: as RGBA, which `convert_to_rgb` composites on white
                array = array[..., [0, 0, 0, 1]]
            array = convert_to_rgb(array, return_numpy=True, input_data_format=ChannelDimension.LAST)
        return np.ascontiguousarray(np.moveaxis(array, -1, 0))

    def _preprocess(
        self,
        images: list[np.ndarray],
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        do_normalize: bool,
        do_convert_rgb: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        if do_normalize:
            _check_mean_std(images, image_mean, image_std, do_convert_rgb)
        return super()._preprocess(
            images, image_mean=image_mean, image_std=image_std, do_normalize=do_normalize, **kwargs
        )

    def _prepare_image_like_inputs(self, images: Any, *args, expected_ndims: int = 3, **kwargs) -> list[np.ndarray]:
        images = self._prepare_images_structure(images, expected_ndims=expected_ndims)
        if images and isinstance(images[0], (list, tuple)):
            images = [image for group in images for image in group]
        processed = []
        for index, image in enumerate(images):
            try:
                processed.append(self.process_image(image, *args, **kwargs))
            except (ValueError, TypeError) as error:
                raise type(error)(f"Image {index} ({_describe(image)}): {error}") from error
        return processed


__all__ = ["SparseMoEVLMImageProcessor", "load_image_file"]
