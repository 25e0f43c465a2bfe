"""Weights that already know Sentinel-2 clouds: ukis-csmask's models as cloudseg checkpoints, for ``init_from``.

ukis-csmask (DLR, Apache License 2.0, https://github.com/dlr-eoc/ukis-csmask) ships ONNX exports of
segmentation-models-pytorch ``Unet`` models with an ``efficientnet-b4`` encoder, trained on Sentinel-2 cloud and
cloud-shadow masks. The 4-band models take blue, green, red and near infrared, the bands of the On Cloud N chips,
in that order (B02, B03, B04, B08). Their initializers keep PyTorch's parameter names (``model.`` + the smp name),
so every tensor maps by name onto ``smp.Unet("efficientnet-b4", in_channels=4)``; the only parts the export left
out are the EfficientNet classifier head (``_conv_head``, ``_bn1``), which smp's encoder never calls.

Their three classes (0 clear, 1 cloud, 2 cloud shadow, softmax) become cloudseg's one cloud logit
``z_cloud - z_clear``: its sigmoid is P(cloud | cloud or clear), and above 0.5 exactly where the softmax ranks
cloud over clear. The normalisation is theirs (reflectance = DN / 10,000 as their ``CSmask`` takes it, unclipped,
then their band means and sds), and a fine-tune keeps it (``Trainer``: a model keeps the normalisation of the
weights it starts from). Clipping reflectance at 1, as conversion 1 did, changes what the model sees on bright
chips: on the real sample's chip adxp (labelled all cloud, blue at DN 9,500-13,300) the L2A model's cloud share
fell from 100% to 18% (tests/test_pretrained.py compares with ``CSmask`` on the real chips).

    init_from: ukis-csmask          # the L2A model (the On Cloud N chips are L2A)
    init_from: ukis-csmask:l1c      # the L1C one
    encoder: efficientnet-b4        # arch: Unet

Needs the ``bench`` extra (``ukis-csmask`` for the files, ``onnx`` to read them); the converted checkpoint is
cached under the state root and records where it came from (``origin``: package, version, file, licence, and
which ``conversion`` of this module made it: an older one is converted anew).
"""

from __future__ import annotations

import json
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import torch

from cloudseg.checkpoint import make_checkpoint, save_checkpoint
from cloudseg.data.io import BANDS
from cloudseg.data.transforms import Normalization
from cloudseg.models import build_model, model_args

UKIS = "ukis-csmask"
UKIS_LEVELS = ("l2a", "l1c")
UKIS_ARCH, UKIS_ENCODER = "Unet", "efficientnet-b4"
UKIS_BANDS = ("blue", "green", "red", "nir")  # = BANDS (B02, B03, B04, B08)
UKIS_CLEAR, UKIS_CLOUD = 0, 1
UKIS_LICENCE = "Apache-2.0"
UKIS_URL = "https://github.com/dlr-eoc/ukis-csmask"
# The EfficientNet classifier head: in smp's state dict, never used by its encoder, absent from the export.
UNUSED = ("encoder._conv_head.", "encoder._bn1.")
# What ukis_checkpoint makes; a cached conversion of another number is made anew. 1: reflectance clipped at 1;
# 2: reflectance unclipped, as ukis-csmask's CSmask takes it.
UKIS_CONVERSION = 2
UKIS_CLIP = 65535 / 10000.0  # the largest uint16 DN: no reflectance is clipped


class PretrainedError(ValueError):
    """A pretrained source that cannot be had or does not fit; the message says what to do."""


def parse_ukis(value: str) -> str | None:
    """The level an ``init_from`` value names (``ukis-csmask`` or ``ukis-csmask:<level>``), else None."""
    if value != UKIS and not value.startswith(UKIS + ":"):
        return None
    level = value.partition(":")[2].lower() or "l2a"
    if level not in UKIS_LEVELS:
        raise PretrainedError(f"init_from: {value!r}: the level must be one of {', '.join(UKIS_LEVELS)}")
    return level


def _ukis_files(level: str) -> tuple[Path, dict, str]:
    try:
        version = metadata.version(UKIS)
        folder = resources.files("ukis_csmask")
    except (metadata.PackageNotFoundError, ModuleNotFoundError) as exc:
        raise PretrainedError(f"init_from: {UKIS} is not installed: pip install '{UKIS}[cpu]' onnx "
                              "(or pip install -e '.[bench]')") from exc
    onnx_file = Path(str(folder / f"model_4b_{level}.onnx"))
    spec_file = onnx_file.with_suffix(".json")
    if not onnx_file.is_file() or not spec_file.is_file():
        raise PretrainedError(f"init_from: {UKIS} {version} has no 4-band {level} model ({onnx_file.name})")
    return onnx_file, json.loads(spec_file.read_text()), version


def _initializers(onnx_file: Path) -> dict[str, np.ndarray]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise PretrainedError("init_from: reading ukis-csmask's weights needs the onnx package: pip install onnx "
                              "(it is in the bench extra)") from exc
    graph = onnx.load(str(onnx_file)).graph
    return {t.name.removeprefix("model."): numpy_helper.to_array(t) for t in graph.initializer}


def ukis_checkpoint(level: str, path: Path | str) -> Path:
    """Convert ukis-csmask's 4-band ``level`` model into a cloudseg checkpoint at ``path`` (written atomically).

    Raises:
        PretrainedError: ukis-csmask or onnx missing, or the export does not match smp's model tensor for tensor.
    """
    onnx_file, spec, version = _ukis_files(level)
    data, model_spec = spec["data"], spec["model"]
    names = tuple(data["dataset_statistics"]["band_names"])
    if (model_spec.get("decoder_name"), model_spec.get("encoder_name")) != ("unet", UKIS_ENCODER) \
            or names != UKIS_BANDS:
        raise PretrainedError(f"{onnx_file}: {model_spec.get('decoder_name')}+{model_spec.get('encoder_name')} on "
                              f"bands {names}; cloudseg maps only unet+{UKIS_ENCODER} on {UKIS_BANDS}")
    theirs = _initializers(onnx_file)
    model = build_model(UKIS_ARCH, UKIS_ENCODER, in_channels=len(BANDS), classes=1)
    state = model.state_dict()
    head_w, head_b = "segmentation_head.0.weight", "segmentation_head.0.bias"
    problems = []
    for name, tensor in state.items():
        if name in (head_w, head_b) or name.endswith("num_batches_tracked") or name.startswith(UNUSED):
            continue
        got = theirs.get(name)
        if got is None or tuple(got.shape) != tuple(tensor.shape):
            problems.append(f"{name}: {None if got is None else tuple(got.shape)} vs {tuple(tensor.shape)}")
            continue
        state[name] = torch.from_numpy(np.array(got, dtype=np.float32))
    classes = int(data["classes"])
    if theirs.get(head_w) is None or theirs[head_w].shape[0] != classes:
        problems.append(f"{head_w}: not a {classes}-class head")
    if problems:
        raise PretrainedError(f"{onnx_file}: does not map onto smp's {UKIS_ARCH}+{UKIS_ENCODER}: "
                              + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
    w, b = theirs[head_w].astype(np.float32), theirs[head_b].astype(np.float32)
    state[head_w] = torch.from_numpy(w[UKIS_CLOUD:UKIS_CLOUD + 1] - w[UKIS_CLEAR:UKIS_CLEAR + 1])
    state[head_b] = torch.from_numpy(b[UKIS_CLOUD:UKIS_CLOUD + 1] - b[UKIS_CLEAR:UKIS_CLEAR + 1])
    model.load_state_dict(state)
    mean, std = data["dataset_statistics"]["img"]
    norm = Normalization(divisor=10000.0, clip=UKIS_CLIP, mean=tuple(map(float, mean)), std=tuple(map(float, std)))
    origin = {"package": UKIS, "version": version, "conversion": UKIS_CONVERSION, "file": onnx_file.name,
              "model_version": model_spec.get("version", ""), "licence": UKIS_LICENCE, "url": UKIS_URL,
              "head": "cloud logit = z_cloud - z_clear of the 3-class (clear, cloud, shadow) head"}
    ckpt = make_checkpoint(model, model_args(UKIS_ARCH, UKIS_ENCODER), norm.to_dict(), 0.5, {}, epoch=0)
    ckpt["origin"] = origin
    return save_checkpoint(ckpt, path)


def ukis_cached(level: str, path: Path | str) -> Path:
    """``path`` where it holds this conversion of the installed ukis-csmask's ``level`` model, else
    ``ukis_checkpoint(level, path)``: a cache made by an older conversion or another ukis-csmask is replaced."""
    from cloudseg.checkpoint import load_checkpoint

    path = Path(path)
    if path.is_file():
        try:
            origin = load_checkpoint(path).get("origin") or {}
        except Exception:  # noqa: BLE001 - unreadable or truncated: convert again
            origin = {}
        try:
            installed = metadata.version(UKIS)
        except metadata.PackageNotFoundError:
            installed = None
        if origin.get("conversion") == UKIS_CONVERSION and origin.get("version") == installed:
            return path
    return ukis_checkpoint(level, path)
