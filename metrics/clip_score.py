"""CLIP score with open_clip: per image max(100 * cos(image, text), 0), averaged.

The paper's text-to-image tables (DeepCache Tables 12, 14, 15) use open_clip
``ViT-g-14`` / ``laion2b_s34b_b88k`` and the scaled, clamped cosine of
torchmetrics' ``CLIPScore`` (a w = 100 variant of Hessel et al. 2021,
"CLIPScore", Eq. 1, whose w is 2.5).  Each image is paired with its own prompt.

Images go through the open_clip validation transform of the chosen weights
(resize, centre crop, normalise).  Every result carries :meth:`ClipScorer.record`
(model, weights tag, scale 100, clamp 0) so numbers from different CLIP models
or conventions are never mixed.

Weights: a local checkpoint file (config key ``metrics.clip_checkpoint``), else
the Hugging Face cache of open_clip's tag, else a download.  When the weights
are not on disk and ``HF_HUB_OFFLINE`` is set, construction fails at once with
a one-line :class:`~metrics.features.MissingWeightsError` naming that key.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from metrics.bootstrap import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    MeanReplicates,
    bootstrap,
    check_resamples,
    interval_record,
    intervals,
    paired_intervals,
)
from metrics.errors import one_line
from metrics.features import MissingWeightsError, check_images, hub_offline, iter_batches, no_tf32

__all__ = [
    "ClipScorer",
    "ClipQuality",
    "clip_score",
    "resolve_clip_weights",
    "CLIP_MODEL",
    "CLIP_PRETRAINED",
    "CHECKPOINT_CONFIG_KEY",
    "CLIP_SCALE",
    "CLIP_CLAMP",
]

CLIP_MODEL = "ViT-g-14"
CLIP_PRETRAINED = "laion2b_s34b_b88k"
CHECKPOINT_CONFIG_KEY = "metrics.clip_checkpoint"
CLIP_SCALE = 100.0  # torchmetrics CLIPScore convention
CLIP_CLAMP = 0.0  # scores below are clamped to it


def _cached_weights(tag_cfg: dict, cache_dir: str | os.PathLike | None = None) -> str | None:
    """Path of the tag's weights if already on disk (Hugging Face cache or open_clip's URL cache)."""
    hf_hub = tag_cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        filename = filename or "open_clip_pytorch_model.bin"  # open_clip's default file of a hub repo
        # open_clip prefers a safetensors twin when the repo has one
        twin = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else None
        if twin is None and filename.endswith((".bin", ".pth")):
            twin = filename[:-4] + ".safetensors"
        for name in [n for n in (twin, filename) if n]:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    url = tag_cfg.get("url", "")
    if url:
        local = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(url)
        if local.is_file():
            return str(local)
    return None


def resolve_clip_weights(
    model_name: str,
    pretrained: str | None,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str | None:
    """Local weights file for (model, tag), or ``checkpoint``; ``None`` when ``pretrained`` is None (random init).

    ``cache_dir`` is open_clip's / huggingface_hub's download cache (their default when None).
    """
    import open_clip

    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise MissingWeightsError(f"CLIP checkpoint {checkpoint} does not exist (set by {CHECKPOINT_CONFIG_KEY})")
        return str(checkpoint)
    if pretrained is None:
        return None
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise ValueError(
            f"open_clip has no pretrained tag {pretrained!r} for {model_name!r} (see open_clip.list_pretrained())"
        )
    found = _cached_weights(cfg, cache_dir)
    if found is not None:
        return found
    source = cfg.get("hf_hub") or cfg.get("url")
    if hub_offline():
        raise MissingWeightsError(
            f"open_clip weights {model_name}/{pretrained} ({source}) are not cached and downloads are off "
            f"(HF_HUB_OFFLINE): set {CHECKPOINT_CONFIG_KEY} to a local checkpoint file"
        )
    try:
        return open_clip.download_pretrained(cfg, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as err:  # network errors come in many types; report them in one line
        raise MissingWeightsError(
            f"open_clip weights {model_name}/{pretrained} could not be downloaded from {source} "
            f"({type(err).__name__}: {one_line(err)}); set {CHECKPOINT_CONFIG_KEY} to a local checkpoint file"
        ) from None


class ClipScorer:
    """An open_clip model and its validation transform, scoring (image, prompt) pairs."""

    def __init__(
        self,
        model_name: str = CLIP_MODEL,
        pretrained: str | None = CLIP_PRETRAINED,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        """``pretrained=None`` without ``checkpoint`` gives random weights (tests only)."""
        import open_clip

        self.model_name, self.pretrained = model_name, pretrained
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        weights = resolve_clip_weights(model_name, pretrained, checkpoint, cache_dir)
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
        model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=weights,
            device=self.device,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            image_mean=tag_cfg.get("mean"),
            image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"),
            image_resize_mode=tag_cfg.get("resize_mode"),
        )
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def record(self) -> dict:
        """Settings that identify the numbers this scorer produces (written into every result record)."""
        return {
            "clip_model": self.model_name,
            "clip_pretrained": self.pretrained if self.pretrained is not None else "random-init",
            "clip_checkpoint": None if self.checkpoint is None else os.path.basename(self.checkpoint),
            "clip_scale": CLIP_SCALE,
            "clip_clamp": CLIP_CLAMP,
        }

    @torch.no_grad()
    def scores(self, images, prompts, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Per pair max(100 * cos(image_i, prompt_i), 0), float64, for uint8 N x H x W x C images and N prompts."""
        from PIL import Image

        images = check_images(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"CLIP score needs one prompt per image, got {len(prompts)} for {len(images)} images")
        out = []
        with no_tf32():
            for sl in iter_batches(len(images), batch_size, progress, desc="CLIP score"):
                pixels = torch.stack(
                    [self.preprocess(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)) for img in images[sl]]
                )
                img = self.model.encode_image(pixels.to(self.device)).double()
                txt = self.model.encode_text(self.tokenizer(prompts[sl]).to(self.device)).double()
                cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
                out.append((CLIP_SCALE * cos).clamp_min(CLIP_CLAMP).cpu().numpy())
        return np.concatenate(out)

    def score(self, images, prompts, batch_size: int = 32, progress: bool = False) -> tuple[float, dict]:
        """Mean CLIP score over pairs, and the record dict (plus ``clip_n``, the number of pairs)."""
        per_pair = self.scores(images, prompts, batch_size=batch_size, progress=progress)
        return float(per_pair.mean()), {**self.record(), "clip_n": int(per_pair.size)}


def clip_score(
    images,
    prompts,
    *,
    model_name: str = CLIP_MODEL,
    pretrained: str | None = CLIP_PRETRAINED,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[float, dict]:
    """One-shot :meth:`ClipScorer.score` (loads the model; keep a :class:`ClipScorer` to score several sets)."""
    scorer = ClipScorer(model_name, pretrained, checkpoint=checkpoint, device=device, cache_dir=cache_dir)
    return scorer.score(images, prompts, batch_size=batch_size, progress=progress)


class ClipQuality:
    """The CLIP-score quality of a run (``conf/quality/clip.yaml``): each image against its own prompt;
    a :class:`metrics.quality.QualityEvaluator`.

    ``quality(images, prompts)`` returns ``{"protocol", "clip_score", "clip_model", ...}``;
    the protocol ``open_clip/<model>/<weights>`` keeps different CLIP models apart in tables.
    With ``resamples`` > 0 it has ``clip_score_low`` / ``clip_score_high``, the 95 % bootstrap
    interval of the mean over the pairs (:mod:`metrics.bootstrap`, seed ``interval_seed``);
    ``quality.paired(images, baseline_images, prompts)`` adds ``clip_score_delta`` and its interval.
    """

    needs_prompts = True

    def check_samples(self, num_samples: int) -> None:
        """Any number of images can be scored (:class:`metrics.quality.QualityEvaluator`)."""

    def __init__(
        self,
        model: str = CLIP_MODEL,
        pretrained: str | None = CLIP_PRETRAINED,
        checkpoint: str | os.PathLike | None = None,
        batch_size: int = 32,
        device: str | None = None,
        progress: bool = False,
        resamples: int = DEFAULT_RESAMPLES,
        interval_seed: int = DEFAULT_SEED,
    ):
        self.resamples, self.interval_seed = check_resamples(resamples), int(interval_seed)
        self.scorer = ClipScorer(model, pretrained, checkpoint=checkpoint, device=device)
        self.batch_size, self.progress = batch_size, progress
        self.protocol = f"open_clip/{model}/{pretrained or 'random-init'}"

    def _scores(self, images, prompts) -> np.ndarray:
        if prompts is None:
            raise ValueError("the CLIP score needs the prompt of each image; this model has none")
        return self.scorer.scores(images, prompts, batch_size=self.batch_size, progress=self.progress)

    def _record(self, per_pair: np.ndarray, reps: dict) -> dict:
        out = {"protocol": self.protocol, "clip_score": float(per_pair.mean())}
        if self.resamples:
            out.update(intervals(out, reps))
        out.update({**self.scorer.record(), "clip_n": int(per_pair.size)})
        return {**out, **interval_record(self.resamples, self.interval_seed)} if self.resamples else out

    def _replicates(self, per_pair: np.ndarray) -> dict:
        if not self.resamples:
            return {}
        return bootstrap([MeanReplicates(per_pair, "clip_score")], per_pair.size, self.resamples, self.interval_seed)

    def __call__(self, images, prompts) -> dict:
        per_pair = self._scores(images, prompts)
        return self._record(per_pair, self._replicates(per_pair))

    def paired(self, images, baseline_images, prompts) -> tuple[dict, dict]:
        """(measurements of ``images``, of ``baseline_images``), the first with ``clip_score_delta`` and its
        interval from the same resampled pairs (image i and baseline image i share prompt i and noise)."""
        if len(images) != len(baseline_images):
            raise ValueError(f"paired scoring needs as many images as baseline images, got {len(images)} and "
                             f"{len(baseline_images)}")
        ours, base = self._scores(images, prompts), self._scores(baseline_images, prompts)
        reps, base_reps = self._replicates(ours), self._replicates(base)
        out, base_out = self._record(ours, reps), self._record(base, base_reps)
        if self.resamples:
            deltas = paired_intervals(out, reps, base_out, base_reps)
            at = list(out).index("clip_score_high") + 1
            items = list(out.items())
            out = dict(items[:at] + list(deltas.items()) + items[at:])
        return out, base_out
