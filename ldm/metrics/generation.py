"""Generation metrics: FID, KID, Inception Score, and FD-CLIP, exact across ranks.

* Features: torch-fidelity's Inception-v3 (``inception-v3-compat``, the TF-FID network that
  torchmetrics wraps too): 2048-d pool features for FID / KID and the unbiased logits for IS,
  one pass per image. The weights come from a local file (``weights``) or, where the machine
  is online and ``weights`` is None, torch-fidelity's download. Real and generated images take
  the same path: [-1, 1] floats -> uint8 (:func:`~ldm.data.transforms.to_uint8`) -> the
  extractor's own bilinear resize to 299.
* FD-CLIP: the same Fréchet distance in the feature space of a CLIP image tower (ours or an
  open_clip file; Kynkäänniemi et al. 2023 argue such features track human judgement better
  than Inception's), needs no external weights.
* Math: torch-fidelity's ``fid_statistics_to_metric``, ``kid_features_to_metric`` and
  ``isc_features_to_metric`` on float64 features, so values equal
  ``torch_fidelity.calculate_metrics`` on the same images (tested).
* Distribution: features are torchmetrics list states (``dist_reduce_fx="cat"``) tagged with
  each image's global index; ``compute`` gathers them from every rank (torchmetrics' sync, or
  :meth:`GenerationMetrics.load_features` with the sync off) and orders them by index, so N
  images spread over any number of ranks give exactly the single-process numbers (no per-rank FID).

* Reconstruction: the autoencoder's rFID is :class:`StreamingFID`, the same Inception loading, features
  and Fréchet distance over running moments (the same images give the same FID through both).

Reference (real) features can be set from a cache (:mod:`ldm.metrics.reference`) instead of
being recomputed for every evaluation.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ldm.data.transforms import to_uint8

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


def write_random_inception_weights(path: str | os.PathLike) -> str:
    """Save torch-fidelity's Inception-v3 with random weights, in the released file's format, to ``path``.

    For tests and benchmarks on machines that cannot download the real weights: it exercises the real
    loading and feature path, and FIDs computed with it are not meaningful (label them so).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        """torch-fidelity's extractor keeping its initialisation: the constructor always loads a weights file
        strictly; here the (empty) file loads non-strictly, so nothing is replaced."""

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            return super().load_state_dict(state_dict, strict=False, assign=assign)

    stub = f"{path}.empty"
    torch.save({}, stub)
    try:
        torch.manual_seed(0)
        model = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=stub)
    finally:
        os.remove(stub)
    # PyTorch's default init shrinks activations through Inception's ~90 ReLU layers to ~1e-7 (and to slow
    # denormals), which makes every image's features equal; He init keeps their scale, so distances are informative
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
    torch.save(model.state_dict(), path)
    return str(path)


class InceptionFeatures(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> (pool features (B, 2048), unbiased logits (B, 1008)), float64.

    The weights come from their file only: a module holding this one saves none of them in its
    checkpoints, and loading a checkpoint keeps the file's (older autoencoder checkpoints carried a
    copy of the network under ``fid.inception.``; it is skipped).
    """

    def __init__(self, weights: str | None = "download"):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,
        )

        if weights == "download":
            weights = None
        if weights is not None:
            weights = os.path.expanduser(str(weights))
            if not os.path.isfile(weights):
                raise FileNotFoundError(
                    f"Inception weights {weights} do not exist: download {INCEPTION_URL} on a machine with internet "
                    "and pass its local path")
        self.weights = weights
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=weights)
        except Exception as e:  # torch-fidelity's download failed: say what to do
            if weights is not None:
                raise
            raise RuntimeError(f"could not download the Inception weights ({e}); fetch {INCEPTION_URL} and pass "
                               "its path as the Inception weights") from e
        self.net.eval().requires_grad_(False)
        self.register_state_dict_post_hook(_without_weights)
        self.register_load_state_dict_pre_hook(_keep_file_weights)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pool, logits = self.net(to_uint8(images))
        return pool.double(), logits.double()


def _without_weights(module: InceptionFeatures, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _keep_file_weights(module: InceptionFeatures, state_dict: dict, prefix: str, *args) -> None:
    """Whatever a checkpoint holds under this module (nothing, or an older layout) gives way to the file's weights."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    state_dict.update(module.net.state_dict(prefix=prefix + "net."))


class ClipImageFeatures(nn.Module):
    """Images in [-1, 1] -> normalised CLIP image embeddings (B, D), float64 (for FD-CLIP)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images.to(self.clip.logit_scale.device)).double()


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) (torch-fidelity's formula)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = [fid_features_to_statistics(x.double().cpu()) for x in (a, b)]
    return frechet_distance_of_statistics(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"])


def frechet_distance_of_statistics(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b): torch-fidelity's ``fid_statistics_to_metric``."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    def stats(mu, sigma):
        return {"mu": torch.as_tensor(mu).double().cpu().numpy(), "sigma": torch.as_tensor(sigma).double().cpu().numpy()}

    return fid_statistics_to_metric(stats(mu_a, sigma_a), stats(mu_b, sigma_b), verbose=False)[KEY_METRIC_FID]


def kernel_inception_distance(a: Tensor, b: Tensor, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    """(mean, std) of the polynomial-kernel MMD^2 over random subsets (Bińkowski et al. 2018)."""
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    size = min(subset_size, len(a), len(b))
    out = kid_features_to_metric(a.double().cpu(), b.double().cpu(), kid_subsets=subsets, kid_subset_size=size,
                                 kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=2020, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over splits of exp(E KL(p(y|x) || p(y))) (Salimans et al. 2016)."""
    from torch_fidelity.metric_isc import (
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        isc_features_to_metric,
    )

    out = isc_features_to_metric(logits.double().cpu(), splits=min(splits, len(logits)), shuffle=True, rng_seed=2020)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def _cat(state: list[Tensor] | Tensor) -> Tensor | None:
    """A list state as one tensor (after a sync torchmetrics has already concatenated it)."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if state else None


class GenerationMetrics(Metric):
    """FID, KID, IS (and FD-CLIP with a CLIP) of generated images against real ones.

    ``update(images, index, real=False)`` adds images (B, 3, H, W) in [-1, 1] with their global
    indices (B,); ``set_reference`` installs cached real features instead of real updates.
    ``compute`` returns ``is``, ``is_std`` and, with real features, ``fid``, ``kid``, ``kid_std``
    and (with a CLIP) ``fd_clip``.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, inception: InceptionFeatures | None, clip: ClipImageFeatures | None = None, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, is_splits: int = 10, **kwargs):
        super().__init__(**kwargs)
        if inception is None and clip is None:
            raise ValueError("GenerationMetrics needs Inception weights (FID / KID / IS) or a CLIP (FD-CLIP)")
        self.inception, self.clip = inception, clip
        self.kid_subsets, self.kid_subset_size, self.is_splits = kid_subsets, kid_subset_size, is_splits
        for side in ("fake", "real"):
            for name in ("index", "pool", "logits", "clip"):
                self.add_state(f"{side}_{name}", default=[], dist_reduce_fx="cat")
        self._reference: dict[str, Tensor] | None = None
        #: the real features of all ranks, after ``compute`` (to store as a reference)
        self.gathered_real: dict[str, Tensor] | None = None

    def update(self, images: Tensor, index: Tensor, real: bool = False) -> None:
        side = "real" if real else "fake"
        getattr(self, f"{side}_index").append(index.to(self.device).long())
        if self.inception is not None:
            pool, logits = self.inception(images.to(self.device))
            getattr(self, f"{side}_pool").append(pool)
            getattr(self, f"{side}_logits").append(logits)
        if self.clip is not None:
            getattr(self, f"{side}_clip").append(self.clip(images).to(self.device))

    def local_features(self) -> dict[str, Tensor]:
        """This process's feature states (CPU), to gather from every rank for :meth:`load_features`."""
        out = {}
        for side in ("fake", "real"):
            for name in ("index", "pool", "logits", "clip"):
                value = _cat(getattr(self, f"{side}_{name}"))
                if value is not None and len(value):
                    out[f"{side}_{name}"] = value.cpu()
        return out

    def load_features(self, parts: list[dict[str, Tensor]]) -> None:
        """Replace the states with the :meth:`local_features` of every rank (any order: ``compute`` sorts by
        index), for a ``compute`` on exactly the features one process would hold (built with
        ``sync_on_compute=False``, so torchmetrics does not gather them a second time)."""
        for side in ("fake", "real"):
            for name in ("index", "pool", "logits", "clip"):
                key = f"{side}_{name}"
                found = [p[key] for p in parts if key in p]
                setattr(self, key, [torch.cat(found).to(self.device)] if found else [])

    def set_reference(self, reference: dict[str, Tensor]) -> None:
        """Real features computed earlier (``pool`` (N, 2048) and optionally ``clip`` (N, D))."""
        self._reference = reference

    def _side(self, side: str) -> dict[str, Tensor]:
        if side == "real" and self._reference is not None:
            return {k: v.double() for k, v in self._reference.items()}
        index = _cat(getattr(self, f"{side}_index"))
        if index is None or len(index) == 0:
            return {}
        order = torch.argsort(index)
        states = {name: _cat(getattr(self, f"{side}_{name}")) for name in ("pool", "logits", "clip")}
        return {name: value[order] for name, value in states.items() if value is not None and len(value)}

    def compute(self) -> dict[str, float]:
        fake, real = self._side("fake"), self._side("real")
        if real and self._reference is None:  # gathered from every rank: what a reference cache stores
            self.gathered_real = {k: v.float().cpu() for k, v in real.items() if k != "logits"}
        if not fake:
            raise ValueError("no generated images were added")
        out: dict[str, float] = {}
        if "logits" in fake:
            out["is"], out["is_std"] = inception_score(fake["logits"], self.is_splits)
        if "pool" in real and "pool" in fake:
            out["fid"] = frechet_distance(real["pool"], fake["pool"])
            out["kid"], out["kid_std"] = kernel_inception_distance(real["pool"], fake["pool"], self.kid_subsets,
                                                                   self.kid_subset_size)
        if "clip" in real and "clip" in fake:
            out["fd_clip"] = frechet_distance(real["clip"], fake["clip"])
        return out



class StreamingFID(Metric):
    """FID of images against real ones from running feature moments: the autoencoder's rFID.

    The Inception features (:class:`InceptionFeatures`) and the Fréchet distance
    (:func:`frechet_distance_of_statistics`) are :class:`GenerationMetrics`' own; only the moments are kept
    (sum and sum of outer products per side, float64, summed across ranks by torchmetrics' sync) instead
    of every feature, so memory stays O(D^2) however large the validation split. The same images give
    :class:`GenerationMetrics`' FID (to float64 rounding: np.cov of the stored features there, the moments here).
    ``update(images, real)`` takes images (B, 3, H, W) in [-1, 1]; ``compute`` returns the FID (a 0-d tensor).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, inception: InceptionFeatures, **kwargs):
        super().__init__(**kwargs)
        self.inception = inception
        dim = 2048
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, real: bool) -> None:
        side = "real" if real else "fake"
        pool, _ = self.inception(images)  # (B, 2048) float64
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + pool.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + pool.t() @ pool)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + len(pool))

    def _moments(self, side: str) -> tuple[Tensor, Tensor]:
        n = int(getattr(self, f"{side}_count"))
        if n < 2:
            raise ValueError(f"FID needs at least 2 {side} images, got {n}")
        mu = getattr(self, f"{side}_sum") / n  # (D,)
        sigma = (getattr(self, f"{side}_outer") - n * torch.outer(mu, mu)) / (n - 1)  # (D, D), np.cov's
        return mu, sigma

    def compute(self) -> Tensor:
        (mu_r, sigma_r), (mu_f, sigma_f) = self._moments("real"), self._moments("fake")
        return torch.tensor(frechet_distance_of_statistics(mu_r, sigma_r, mu_f, sigma_f), dtype=torch.float64)
