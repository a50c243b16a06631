"""CLIP score on a small open_clip model with random weights, created offline."""

import time

import numpy as np
import pytest
import torch

from metrics import clip_score as cs
from metrics.clip_score import ClipScorer, resolve_clip_weights
from metrics.features import MissingWeightsError

MODEL = "ViT-S-32"  # small built-in architecture; random init (pretrained=None)
PROMPTS = ["a red car", "a photo of a cat", "blue sky over the sea", "two dogs", "a bowl of fruit", "snow"]


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    return ClipScorer(MODEL, pretrained=None, device="cpu")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(len(PROMPTS), 40, 48, 3), dtype=np.uint8)


def _reference_scores(scorer, images, prompts):
    """Independent of ClipScorer.scores: embeddings one by one, cosine in numpy, then 100x and clamp at 0."""
    from PIL import Image

    out = []
    with torch.no_grad():
        for img, prompt in zip(images, prompts):
            a = scorer.model.encode_image(scorer.preprocess(Image.fromarray(img))[None]).double().numpy()[0]
            b = scorer.model.encode_text(scorer.tokenizer([prompt])).double().numpy()[0]
            out.append(max(100.0 * a @ b / np.linalg.norm(a) / np.linalg.norm(b), 0.0))
    return np.array(out)


def test_scores_are_clamped_scaled_cosines(scorer, images):
    scores = scorer.scores(images, PROMPTS, batch_size=4)
    np.testing.assert_allclose(scores, _reference_scores(scorer, images, PROMPTS), rtol=1e-5, atol=1e-5)
    assert ((scores >= 0) & (scores <= 100)).all()
    assert (scores == 0).any() and (scores > 0).any()  # random weights: some cosines are negative -> clamped


def test_batch_size_invariance(scorer, images):
    one, six = scorer.scores(images, PROMPTS, batch_size=1), scorer.scores(images, PROMPTS, batch_size=6)
    np.testing.assert_allclose(one, six, rtol=1e-5, atol=1e-5)


def test_prompts_are_paired_with_their_own_images(scorer, images):
    two = images[:2]
    forward = scorer.scores(two, PROMPTS[:2])
    swapped_prompts = scorer.scores(two, PROMPTS[1::-1])
    swapped_images = scorer.scores(two[::-1], PROMPTS[:2])
    # image 0 with prompt 1, computed in two orders; and image 1 with prompt 0
    assert swapped_prompts[0] == pytest.approx(swapped_images[1], abs=1e-5)
    assert swapped_prompts[1] == pytest.approx(swapped_images[0], abs=1e-5)
    assert not np.allclose(forward, swapped_prompts)


def test_score_is_the_mean_and_carries_the_record(scorer, images):
    value, record = scorer.score(images, PROMPTS)
    assert value == pytest.approx(scorer.scores(images, PROMPTS).mean(), rel=1e-6)
    assert record == {
        "clip_model": MODEL,
        "clip_pretrained": "random-init",
        "clip_checkpoint": None,
        "clip_scale": 100.0,
        "clip_clamp": 0.0,
        "clip_n": len(PROMPTS),
    }


@pytest.mark.integration
def test_local_checkpoint_is_loaded(scorer, images, tmp_path):
    path = tmp_path / "clip.pt"
    torch.save(scorer.model.state_dict(), path)
    loaded = ClipScorer(MODEL, pretrained=None, checkpoint=path, device="cpu")
    expected = scorer.scores(images[:2], PROMPTS[:2])
    np.testing.assert_allclose(loaded.scores(images[:2], PROMPTS[:2]), expected, atol=1e-6)
    assert loaded.record()["clip_checkpoint"] == "clip.pt"


def test_grey_images_score_like_their_rgb_copies(scorer, images):
    grey = images[:2, ..., :1]
    rgb = scorer.scores(np.repeat(grey, 3, -1), PROMPTS[:2])
    np.testing.assert_allclose(scorer.scores(grey, PROMPTS[:2]), rgb, atol=1e-6)


def test_prompt_count_must_match(scorer, images):
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.scores(images, PROMPTS[:2])


def test_offline_missing_weights_fail_at_once_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE") as err:
        ClipScorer("ViT-g-14", "laion2b_s34b_b88k", device="cpu", cache_dir=tmp_path)
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    assert "\n" not in message and "metrics.clip_checkpoint" in message and "laion/CLIP-ViT-g-14" in message


def test_missing_checkpoint_file_names_the_key(tmp_path):
    with pytest.raises(MissingWeightsError, match="metrics.clip_checkpoint"):
        resolve_clip_weights(MODEL, None, checkpoint=tmp_path / "missing.pt")


def test_hf_cache_hit_is_used_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--laion--CLIP-ViT-g-14-laion2B-s34B-b88K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"x")
    assert resolve_clip_weights("ViT-g-14", "laion2b_s34b_b88k", cache_dir=tmp_path) == str(
        snapshot / "open_clip_model.safetensors"
    )


def test_unknown_tag_is_rejected():
    with pytest.raises(ValueError, match="no pretrained tag"):
        cs.resolve_clip_weights("ViT-g-14", "no-such-tag")


@pytest.mark.integration
def test_clip_quality_interval_and_paired_difference(scorer, images, monkeypatch):
    from metrics.clip_score import ClipQuality

    monkeypatch.setattr(cs, "ClipScorer", lambda *a, **k: scorer)  # reuse the fixture's random model
    quality = ClipQuality(MODEL, pretrained=None, device="cpu", resamples=40)
    flipped = images[:, ::-1].copy()
    ours, base = quality.paired(images, flipped, PROMPTS)
    per_pair, per_base = scorer.scores(images, PROMPTS), scorer.scores(flipped, PROMPTS)
    assert ours["clip_score"] == pytest.approx(per_pair.mean()) and base["clip_score"] == pytest.approx(per_base.mean())
    assert ours["clip_score_low"] <= ours["clip_score"] <= ours["clip_score_high"]
    assert ours["clip_score_delta"] == pytest.approx(per_pair.mean() - per_base.mean())
    # the paired interval is the bootstrap of the mean of the per-pair differences
    diffs = per_pair - per_base
    idx = np.random.default_rng(0).integers(0, len(diffs), size=(40, len(diffs)))
    half = 1.959963984540054 * diffs[idx].mean(axis=1).std(ddof=1)
    assert ours["clip_score_delta_high"] - ours["clip_score_delta"] == pytest.approx(half, rel=1e-6)
    assert base == quality(flipped, PROMPTS) and "clip_score_delta" not in base
    assert list(ours)[:6] == ["protocol", "clip_score", "clip_score_low", "clip_score_high", "clip_score_delta",
                              "clip_score_delta_low"]
    assert ours["quality_interval"] == "bootstrap-normal-95" and ours["clip_n"] == len(PROMPTS)
