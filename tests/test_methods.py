"""The contract every caching method passes (docs/methods.md), whatever the method.

Parametrised over the ``cache`` config group: a method added as ``bench/caching/<name>.py`` +
``conf/cache/<name>.yaml`` is tested here without editing this file. Each method declares an
enabled example setting (``example_knobs``), the knobs that make it a no-op (``noop_knobs``)
and another value per knob (``other_values``). Runs on a tiny text-conditioned U-Net with
classifier-free guidance (every method applies to it) and DDIM-8:

* the no-op setting reproduces the uncached model's samples bit-exactly;
* images do not depend on the batch size they were generated in;
* the MACs counted per kind of call (:func:`bench.cost.measure.call_macs`, on the meta
  device) equal a direct count of the convolutions and linear layers that ran in a real
  call of that kind (from the shapes each module saw);
* the store key changes when any knob changes;
* a run killed between batches resumes to the same images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler
from hydra.utils import get_class
from torch import nn

from bench.caching.method import FULL, CacheMethod, Target, apply, uncached
from bench.core.images import to_uint8
from bench.cost import measure
from bench.models.loading import LoadedModel, ModelSpec
from bench.sampling import generate
from bench.sampling import loop as sampling
from bench.sampling.loop import SamplerSpec
from bench.sampling.store import ImageStore
from tiny import tiny_unet2d_cond

ROOT = Path(__file__).resolve().parent.parent
METHOD_CONFIGS = sorted((ROOT / "conf" / "cache").glob("*.yaml"))
STEPS, TOKENS, GUIDANCE = 8, 4, 2.0
TARGET = Target(conditioning="text", guided=True)
SAMPLER = SamplerSpec(name="ddim", scheduler_class="diffusers.DDIMScheduler", steps=STEPS)
MODEL = ModelSpec(name="tiny", unet_class="diffusers.UNet2DConditionModel", arch="-", pretrained=None, subfolder=None,
                  scheduler_subfolder=None, weights="random", init_seed=0, conditioning="text",
                  context_tokens=TOKENS, guidance_scale=GUIDANCE, output="pixels", pipeline=None)


def method_class(path: Path) -> type[CacheMethod]:
    target = yaml.safe_load(path.read_text()).get("_target_") or "bench.caching.engine.CacheSettings"
    return get_class(target)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    unet = tiny_unet2d_cond().eval()
    return LoadedModel(unet, dict(DDIMScheduler(num_train_timesteps=1000).config), "random:test")


class Prompted:
    """Per-sample text conditioning that depends only on the sample's index; guided."""

    guidance_scale = GUIDANCE

    def __init__(self, fail_after: int | None = None):
        self.fail_after, self.decoded = fail_after, 0

    def key(self) -> dict:
        return {"pipe": "test"}

    def prompts_for(self, indices):
        return None

    def conditioning(self, indices):
        ctx = torch.stack([torch.randn(TOKENS, 16, generator=torch.Generator().manual_seed(1000 + i)) for i in indices])
        return {"encoder_hidden_states": ctx}, {"encoder_hidden_states": torch.zeros_like(ctx)}

    def decode(self, x):
        if self.fail_after is not None and self.decoded >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.decoded += 1
        return to_uint8(x[:, :3])


def caching(cls: type[CacheMethod], loaded: LoadedModel, **over):
    method = cls.from_settings({**cls.example_knobs, **over}, {})
    calibrate = generate.calibration(loaded, MODEL, SAMPLER, generate.GenerationSpec(seed=0, progress=False))
    return apply(method, loaded.unet, num_calls(loaded), TARGET, calibrate)


def num_calls(loaded: LoadedModel) -> int:
    return sampling.num_model_calls(sampling.build_scheduler(SAMPLER, loaded.scheduler_config))


def denoise(loaded: LoadedModel, c, indices=range(3)) -> torch.Tensor:
    pipe = Prompted()
    scheduler = sampling.build_scheduler(SAMPLER, loaded.scheduler_config)
    gens = sampling.sample_generators(0, indices)
    noise = sampling.initial_noise(gens, loaded.sample_shape, "cpu", torch.float32)
    cond, uncond = pipe.conditioning(indices)
    with torch.inference_mode(), c.attach(loaded.unet):
        return sampling.denoise(loaded.unet, scheduler, noise, cond=cond, uncond=uncond, guidance_scale=GUIDANCE,
                                generators=gens)


def images(loaded, c, root: Path, batch_size: int, indices=range(4), pipe=None):
    store = ImageStore(root, {"test": str(root)})
    gen = generate.GenerationSpec(seed=0, batch_size=batch_size, progress=False)
    generate.generate(loaded, SAMPLER, c, store, indices, pipe or Prompted(), gen)
    return store.load(indices)


params = pytest.mark.parametrize("path", METHOD_CONFIGS, ids=[p.stem for p in METHOD_CONFIGS])


def test_every_method_declares_its_test_settings():
    assert len(METHOD_CONFIGS) >= 4
    for path in METHOD_CONFIGS:
        cls = method_class(path)
        knobs = {f.name for f in dataclasses.fields(cls)}
        assert issubclass(cls, CacheMethod) and cls.name
        assert set(cls.other_values) == knobs, f"{cls.name}: other_values must name every knob"
        assert set(cls.example_knobs) | set(cls.noop_knobs) <= knobs
        assert cls.from_settings(cls.example_knobs, {}).enabled
        assert not cls.from_settings({**cls.example_knobs, **cls.noop_knobs}, {}).enabled


@params
def test_the_example_setting_changes_the_samples_and_the_noop_setting_changes_nothing(path, loaded):
    cls = method_class(path)
    plain = denoise(loaded, uncached(num_calls(loaded), TARGET))
    noop = caching(cls, loaded, **cls.noop_knobs)
    assert not noop.enabled and noop.key() == {"schedule": "none"}
    assert torch.equal(denoise(loaded, noop), plain)  # bit-exact
    cached = caching(cls, loaded)
    assert set(cached.plan.kinds) != {FULL} and cached.plan.kinds[0] in (FULL, cached.plan.distinct()[0])
    assert not torch.equal(denoise(loaded, cached), plain)


@params
def test_images_do_not_depend_on_the_batch_size(path, loaded, tmp_path):
    c = caching(method_class(path), loaded)
    whole = images(loaded, c, tmp_path / "a", batch_size=4)
    assert (images(loaded, c, tmp_path / "b", batch_size=1) == whole).all()
    assert (images(loaded, c, tmp_path / "c", batch_size=3) == whole).all()


def direct_macs(unet: nn.Module, run) -> float:
    """Multiply-accumulates of the convolutions and linear layers that ran, from their shapes."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total[0] += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


@params
def test_macs_per_kind_match_a_direct_count_of_what_ran(path, loaded):
    c = caching(method_class(path), loaded)
    counted = measure.call_macs(loaded, MODEL, c)
    unet, kinds = loaded.unet, c.plan.distinct()
    x = torch.randn(2, *loaded.sample_shape)  # one image, guided: both halves
    ctx = torch.randn(2, TOKENS, 16)
    t = torch.tensor(500)
    with torch.inference_mode(), c.attach(unet) as session:
        for kind in kinds:  # in the order of first appearance: the first fills what the others read
            session.force(kind)
            direct = direct_macs(unet, lambda: unet(x, t, encoder_hidden_states=ctx))
            assert counted[kind].paper == pytest.approx(direct / 2, rel=1e-9), kind
        assert session.executed == kinds
    full = direct_macs(unet, lambda: unet(x, t, encoder_hidden_states=ctx))
    assert counted[FULL].paper == pytest.approx(full / 2, rel=1e-9)
    average = sum(counted[k].paper for k in c.plan.kinds) / c.plan.num_calls
    record = measure.macs_record(loaded, MODEL, c)
    assert record["macs_g"] == pytest.approx(average / 1e9, rel=1e-9)
    assert record["macs_predicted_speedup"] == pytest.approx(full / 2 / average, rel=1e-9)


@params
def test_the_store_key_changes_with_every_knob(path, loaded):
    cls = method_class(path)
    example = generate.store_key(loaded, MODEL, SAMPLER, caching(cls, loaded), generate.GenerationSpec(), Prompted())
    for knob, other in cls.other_values.items():
        changed = caching(cls, loaded, **{knob: other})
        key = generate.store_key(loaded, MODEL, SAMPLER, changed, generate.GenerationSpec(), Prompted())
        assert key != example, f"cache.{knob}={other} leaves the store key as it was"
        assert key["cache"] != {"schedule": "none"}


@params
def test_a_killed_run_resumes_to_the_same_images(path, loaded, tmp_path):
    c = caching(method_class(path), loaded)
    whole = images(loaded, c, tmp_path / "a", batch_size=2, indices=range(6))
    with pytest.raises(KeyboardInterrupt):
        images(loaded, c, tmp_path / "b", batch_size=2, indices=range(6), pipe=Prompted(fail_after=1))
    store = ImageStore(tmp_path / "b", {"test": str(tmp_path / "b")})
    assert store.missing(range(6)) == [2, 3, 4, 5]  # the first batch was kept, nothing half-written
    assert (images(loaded, c, tmp_path / "b", batch_size=2, indices=range(6)) == whole).all()


@params
def test_the_unet_is_left_as_it_was(path, loaded):
    unet = loaded.unet
    before = (dict(unet.__dict__), {n: dict(m.__dict__) for n, m in unet.named_modules()})
    denoise(loaded, caching(method_class(path), loaded), indices=range(1))
    after = (dict(unet.__dict__), {n: dict(m.__dict__) for n, m in unet.named_modules()})
    assert after[0].keys() == before[0].keys() and "forward" not in unet.__dict__
    assert {n: d.keys() for n, d in after[1].items()} == {n: d.keys() for n, d in before[1].items()}
    for name, m in unet.named_modules():
        assert "forward" not in m.__dict__, name
        assert not m._forward_hooks and not m._forward_pre_hooks, name
