"""FID and Inception Score of a samples npz against a reference batch, through torch-fidelity.

torch-fidelity's InceptionV3 is the TensorFlow FID network converted weight for weight (with
TF's resize), so its numbers line up with the standard evaluator's. Neither the package nor its
weights ship with EAR Studio, and the weights cannot be fetched at run time offline, so
`missing()` is asked before any sampling and answers with the one sentence that says what to do.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ear.npz import npz_array

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def weights_path() -> Path:
    """Where torch-fidelity looks before downloading (torch hub's checkpoints, under TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def reference_images(reference: Path) -> np.ndarray:
    try:
        images = npz_array(reference, "arr_0")
    except ValueError as err:
        raise ValueError(f"--fid: {err}") from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"--fid: '{reference}' holds {images.shape} {images.dtype} arrays, not uint8 "
                         f"N x H x W x 3 images (arr_0).")
    return images


def missing(reference: Path) -> str | None:
    """None when `scores` can run; otherwise one sentence saying how to make it run."""
    if not reference.is_file():
        return f"--fid: the reference batch '{reference}' does not exist."
    reference_images(reference)
    if importlib.util.find_spec("torch_fidelity") is None or not weights_path().is_file():
        return (f"--fid needs torch-fidelity and its Inception weights, which are not here: run `pip "
                f"install torch-fidelity` and put {WEIGHTS_FILE} (torch-fidelity's v0.2.0 release) in "
                f"{weights_path().parent}, or score the npz with the ImageNet evaluator (README, "
                f"Evaluation).")
    return None


class NpzImages(torch.utils.data.Dataset):
    """uint8 3 x H x W tensors, what torch-fidelity's extractors take, read lazily from arr_0."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)


def scores(samples: Path, reference: Path, batch_size: int = 64) -> dict[str, float]:
    """FID against the reference batch and the Inception Score (10 splits) of the samples."""
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=NpzImages(npz_array(samples, "arr_0")), input2=NpzImages(reference_images(reference)),
        fid=True, isc=True, cuda=torch.cuda.is_available(), batch_size=batch_size, cache=False,
        verbose=False, feature_extractor_weights_path=str(weights_path()))
    return {"fid": metrics["frechet_inception_distance"], "inception_score": metrics["inception_score_mean"],
            "inception_score_std": metrics["inception_score_std"]}
