"""Original checkpoints -> the diffusers layout that ``model.pretrained`` loads.

    python -m bench.convert ldm <model.ckpt> <cin256-v2.yaml> <out_dir>

converts CompVis/latent-diffusion's class-conditional ImageNet model (LDM-4-G of the
DeepCache paper; checkpoint ``model.ckpt`` and config
``configs/latent-diffusion/cin256-v2.yaml`` of CompVis/latent-diffusion) into::

    out_dir/unet/             UNet2DConditionModel   (model.diffusion_model.*)
    out_dir/vqvae/            VQModel                (first_stage_model.*)
    out_dir/class_embedder/   bench.models.ldm.ClassEmbedder (cond_stage_model.embedding.weight)
    out_dir/scheduler/        DDIMScheduler with LDM's betas and DDIM discretisation
    out_dir/model_index.json  the components and where they came from

The U-Net and the VQ encoder/decoder keys are mapped by diffusers' own single-file
utilities (``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``), configured from the original yaml; what they do not
map -- the class embedding and the VQ codebook -- is copied here. Every checkpoint key
must be used: a weight, a schedule buffer checked against the yaml's schedule, or
one of LitEma's two counters; anything missing, left over or of the wrong shape
stops the conversion with one line naming it. Output is written to a temporary
directory renamed at the end, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.core.errors import HarnessError, one_line

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
CLASS_EMBEDDING_KEY = "cond_stage_model.embedding.weight"
CODEBOOK_KEY = "first_stage_model.quantize.embedding.weight"
# DDPM.register_schedule (ldm/models/diffusion/ddpm.py): derived from the betas, which
# the scheduler config reproduces from the yaml; betas and alphas_cumprod are checked
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
# LitEma (ldm/modules/ema.py) counters; the published cin256-v2 checkpoint holds them but no EMA weights
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------ reading inputs


class _Inert:
    """Stands in for any non-tensor Python object pickled in a checkpoint (Lightning
    callbacks, hyper-parameters): built without running any code from the file."""

    def __new__(cls, *args: Any, **kwargs: Any):
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; objects other than tensors and
    containers (a Lightning checkpoint's callbacks, say) load as inert placeholders."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as e:  # not a torch file, truncated archive, ...
        raise HarnessError(f"checkpoint {str(path)!r}: cannot read it ({one_line(e, first=True)})") from None
    find_unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if find_unsafe is None:
        raise HarnessError(
            f"checkpoint {str(path)!r} holds pickled Python objects besides tensors, which this torch "
            "version cannot skip (torch >= 2.5 can); save its state_dict as .safetensors and convert that"
        )
    try:
        stubs = [(_Inert, name) for name in find_unsafe(str(path))]
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HarnessError(f"checkpoint {str(path)!r}: cannot read it ({one_line(e, first=True)})") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an original checkpoint: a ``.safetensors`` file, or a torch
    pickle (``.ckpt``) holding ``{"state_dict": ...}`` or the state dict itself."""
    p = Path(path)
    if not p.is_file():
        raise HarnessError(f"checkpoint {str(path)!r}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except Exception as e:
            raise HarnessError(
                f"checkpoint {str(path)!r}: not a readable safetensors file ({one_line(e, first=True)})"
            ) from None
    obj = _torch_load(p)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise HarnessError(f"checkpoint {str(path)!r} holds no state_dict")
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise HarnessError(f"checkpoint {str(path)!r}: state_dict entries that are not tensors: {_few(bad)}")
    return dict(state)


def load_original_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise HarnessError(f"original config {str(path)!r}: no such file")
    try:
        config = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise HarnessError(f"original config {str(path)!r}: not readable YAML ({one_line(e, first=True)})") from None
    if not isinstance(config, dict):
        raise HarnessError(f"original config {str(path)!r}: not a latent-diffusion config (no 'model' mapping)")
    return config


# ------------------------------------------------------------------------ configs from the yaml


class _Yaml:
    """Nested access to the original config; a missing or unsupported setting is a
    one-line error naming its dotted path."""

    def __init__(self, config: dict[str, Any], name: str):
        self.config, self.name = config, name

    def get(self, path: str, default: Any = ...) -> Any:
        node: Any = self.config
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not ...:
                    return default
                raise HarnessError(f"{self.name}: no {path} (not a latent-diffusion config?)")
            node = node[part]
        return node

    def require(self, path: str, ok: bool, why: str, default: Any = ...) -> None:
        if not ok:
            raise HarnessError(f"{self.name}: {path}={self.get(path, default)!r} is not supported ({why})")


@dataclass
class LdmConfigs:
    unet: dict[str, Any]
    vqvae: dict[str, Any]
    class_embedder: dict[str, Any]
    scheduler: dict[str, Any]


def ldm_configs(original: dict[str, Any], name: str = "original config", num_classes: int = 1000,
                scaling_factor: float | None = None) -> LdmConfigs:
    """diffusers configs of the U-Net, VQ autoencoder, class embedder and scheduler of
    a class-conditional latent-diffusion yaml (``cin256-v2.yaml``)."""
    from diffusers import DDIMScheduler
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    y = _Yaml(original, name)
    P = "model.params"
    for section in ("unet_config.params", "first_stage_config.params.ddconfig", "cond_stage_config.params"):
        y.get(f"{P}.{section}")  # present, or a one-line error naming it
    y.require(f"{P}.conditioning_key", y.get(f"{P}.conditioning_key", None) == "crossattn",
              "the class embedding is a cross-attention context", None)
    y.require(f"{P}.parameterization", y.get(f"{P}.parameterization", "eps") == "eps",
              "the scheduler predicts noise (eps)", "eps")
    y.require(f"{P}.beta_schedule", y.get(f"{P}.beta_schedule", "linear") == "linear",
              "LDM's 'linear' schedule is diffusers' scaled_linear", "linear")
    U = f"{P}.unet_config.params"
    y.require(f"{U}.use_spatial_transformer", y.get(f"{U}.use_spatial_transformer", False) is True,
              "a cross-attention U-Net", False)
    for key, default in (("use_scale_shift_norm", False), ("resblock_updown", False),
                         ("use_linear_in_transformer", False), ("num_classes", None)):
        y.require(f"{U}.{key}", y.get(f"{U}.{key}", default) == default, "not a cin256-v2 U-Net", default)
    y.require(f"{U}.num_head_channels", y.get(f"{U}.num_head_channels", -1) == -1,
              "heads are given by num_heads", -1)
    y.require(f"{U}.context_dim", isinstance(y.get(f"{U}.context_dim", None), int), "one context width", None)
    F = f"{P}.first_stage_config"
    y.require(f"{F}.target", str(y.get(f"{F}.target")).endswith("VQModelInterface"),
              "the first stage of LDM-4-G is a VQ autoencoder")
    D = f"{F}.params.ddconfig"
    y.require(f"{D}.attn_resolutions", not y.get(f"{D}.attn_resolutions", []),
              "diffusers' VQ encoder/decoder blocks have no attention", [])
    y.require(f"{D}.double_z", not y.get(f"{D}.double_z", True), "a VQ encoder has single z", True)
    C = f"{P}.cond_stage_config"
    y.require(f"{C}.target", str(y.get(f"{C}.target")).endswith("ClassEmbedder"), "a class-conditional model")

    resolution = y.get(f"{D}.resolution")
    factor = 2 ** (len(y.get(f"{D}.ch_mult")) - 1)
    if y.get(f"{U}.image_size") * factor != resolution:
        raise HarnessError(
            f"{name}: {U}.image_size={y.get(f'{U}.image_size')} times the autoencoder's factor {factor} "
            f"is not {D}.resolution={resolution}"
        )
    with warnings.catch_warnings():  # image_size is given so that nothing is guessed from checkpoint keys
        warnings.simplefilter("ignore")
        unet = create_unet_diffusers_config_from_ldm(original, {}, image_size=resolution)
        vae = create_vae_diffusers_config_from_ldm(
            original, {}, image_size=resolution,
            scaling_factor=y.get(f"{P}.scale_factor", 1.0) if scaling_factor is None else scaling_factor,
        )
    unet["_class_name"] = "UNet2DConditionModel"
    vqvae = {
        "_class_name": "VQModel", **vae, "num_vq_embeddings": y.get(f"{F}.params.n_embed"),
        "vq_embed_dim": y.get(f"{F}.params.embed_dim"), "norm_num_groups": 32, "act_fn": "silu",
        "norm_type": "group", "mid_block_add_attention": True,
    }
    n = y.get(f"{C}.params.n_classes", 1000)
    dim = y.get(f"{C}.params.embed_dim")
    if n not in (num_classes, num_classes + 1):
        raise HarnessError(
            f"{name}: {C}.params.n_classes={n} is neither the {num_classes} classes nor the classes plus a "
            "null class (--num-classes sets the number of classes)"
        )
    if dim != unet["cross_attention_dim"]:
        raise HarnessError(f"{name}: {C}.params.embed_dim={dim} is not {U}.context_dim={unet['cross_attention_dim']}")
    class_embedder = {
        "_class_name": "ClassEmbedder", "num_embeddings": n, "embedding_dim": dim, "num_classes": num_classes,
        "null_class": num_classes if n == num_classes + 1 else None,
    }
    scheduler = dict(DDIMScheduler.from_config({
        # DDIM as ldm/models/diffusion/ddim.py: timesteps range(0, T, T // steps) + 1
        # (leading spacing, offset 1); the last step goes to alphas_cumprod[0]
        "num_train_timesteps": y.get(f"{P}.timesteps", 1000), "beta_start": y.get(f"{P}.linear_start", 1e-4),
        "beta_end": y.get(f"{P}.linear_end", 2e-2), "beta_schedule": "scaled_linear", "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon",
    }).config)
    scheduler["_class_name"] = "DDIMScheduler"
    return LdmConfigs(unet=unet, vqvae=vqvae, class_embedder=class_embedder, scheduler=scheduler)


# ------------------------------------------------------------------------ the conversion


def _few(names: list[str], n: int = 4) -> str:
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _meta_model(cls: type, config: dict[str, Any]) -> torch.nn.Module:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


@dataclass
class Converted:
    configs: LdmConfigs
    weights: dict[str, dict[str, torch.Tensor]]  # component -> diffusers state dict
    used_keys: int


def convert_ldm(state: dict[str, torch.Tensor], original: dict[str, Any], *, checkpoint_name: str = "checkpoint",
                config_name: str = "original config", num_classes: int = 1000) -> Converted:
    """Map an LDM state dict onto diffusers' U-Net, VQModel and the class embedder.

    Raises ``HarnessError`` (one line) unless every component gets exactly its
    parameters with the right shapes and every checkpoint key is used."""
    from diffusers import UNet2DConditionModel, VQModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from bench.models.ldm import ClassEmbedder

    scaling = float(state["scale_factor"]) if "scale_factor" in state else None  # scale_by_std checkpoints
    configs = ldm_configs(original, config_name, num_classes, scaling)
    missing: list[str] = []  # checkpoint keys (original names)
    absent_prefixes: set[str] = set()

    def mapped(converter, prefix: str, config: dict[str, Any]) -> dict[str, Any]:
        part = {k: v for k, v in state.items() if k.startswith(prefix) and k != CODEBOOK_KEY}
        if not part:
            absent_prefixes.add(prefix)
            missing.append(f"{prefix}*")
            return {}
        try:
            return converter(part, config)
        except KeyError as e:  # the converter indexes some keys directly
            missing.append(f"{prefix}{e.args[0]}")
            return {}

    weights = {
        "unet": mapped(convert_ldm_unet_checkpoint, UNET_PREFIX, configs.unet),
        "vqvae": mapped(convert_ldm_vae_checkpoint, FIRST_STAGE_PREFIX, configs.vqvae),
        "class_embedder": {},
    }
    for component, key, target in (("vqvae", CODEBOOK_KEY, "quantize.embedding.weight"),
                                   ("class_embedder", CLASS_EMBEDDING_KEY, "embedding.weight")):
        if key in state:
            weights[component][target] = state[key]
        else:
            missing.append(key)

    # mapped weights are the checkpoint's own tensors or views of them: data_ptr names their key
    original_name = {v.data_ptr(): k for k, v in state.items()}
    lacking: list[str] = []  # diffusers names nothing was mapped to
    wrong_shape: list[str] = []
    used: set[int] = set()
    prefixes = {"unet": UNET_PREFIX, "vqvae": FIRST_STAGE_PREFIX, "class_embedder": None}
    classes = {"unet": UNet2DConditionModel, "vqvae": VQModel, "class_embedder": ClassEmbedder}
    for component, cls in classes.items():
        expected = {k: tuple(v.shape) for k, v in _meta_model(cls, getattr(configs, component)).state_dict().items()}
        got = {k: v for k, v in weights[component].items() if v is not None and k in expected}
        weights[component] = got
        used |= {v.data_ptr() for v in got.values()}
        if prefixes[component] not in absent_prefixes:
            lacking += [f"{component}/{k}" for k in sorted(set(expected) - set(got))]
        wrong_shape += [
            f"{original_name.get(v.data_ptr(), k)} {tuple(v.shape)} (the yaml needs {expected[k]})"
            for k, v in sorted(got.items()) if tuple(v.shape) != expected[k]
        ]
    known = set(SCHEDULE_BUFFERS) | set(EMA_COUNTERS) | {"scale_factor"}
    unexpected = [k for k, v in state.items() if k not in known and v.data_ptr() not in used]

    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if lacking:
        problems.append(f"no weights for {_few(lacking)} (diffusers names)")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shape {_few(wrong_shape, 2)}")
    problems += _check_schedule(state, configs.scheduler)
    if problems:
        raise HarnessError(f"{checkpoint_name} does not match {config_name}: " + "; ".join(problems))
    return Converted(configs, weights, used_keys=len(state))


def _check_schedule(state: dict[str, torch.Tensor], scheduler_config: dict[str, Any]) -> list[str]:
    """The checkpoint's betas and alphas_cumprod, where present, must be the scheduler's."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    problems = []
    for name, ours in (("betas", sched.betas), ("alphas_cumprod", sched.alphas_cumprod)):
        if name not in state:
            continue
        theirs = state[name].detach().to(torch.float64).reshape(-1)
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours.to(torch.float64), rtol=1e-3, atol=1e-7):
            problems.append(
                f"its {name} do not follow the yaml's schedule (model.params.timesteps, linear_start, linear_end)"
            )
    return problems


# ------------------------------------------------------------------------ writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HarnessError(f"out_dir {str(out_dir)!r} exists and is not an empty directory; choose another")


def write_converted(out_dir: str | os.PathLike, converted: Converted, manifest: dict[str, Any]) -> Path:
    """Write the components and ``model_index.json`` into a temporary directory
    beside ``out_dir`` and rename it into place."""
    from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel, __version__
    from safetensors.torch import save_file

    from bench.models.ldm import SUBFOLDER, ClassEmbedder

    out = Path(out_dir)
    _check_out_dir(out)
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.absolute().parent))
    except OSError as e:
        raise HarnessError(f"out_dir {str(out)!r} cannot be created ({e.strerror})") from None
    c = converted.configs
    try:
        for name, cls, config in (("unet", UNet2DConditionModel, c.unet), ("vqvae", VQModel, c.vqvae),
                                  (SUBFOLDER, ClassEmbedder, c.class_embedder)):
            _meta_model(cls, config).save_config(tmp / name)
            tensors = {k: v.detach().contiguous() for k, v in converted.weights[name].items()}
            save_file(tensors, str(tmp / name / WEIGHTS_NAME), metadata={"format": "pt"})
        DDIMScheduler.from_config(c.scheduler).save_config(tmp / "scheduler")
        index = {
            "_class_name": "ClassConditionalLDM",
            "_diffusers_version": __version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vqvae": ["diffusers", "VQModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            SUBFOLDER: ["bench.models.ldm", "ClassEmbedder"],
            "converted_from": manifest,
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"out_dir {str(out)!r}: cannot write the converted model ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_ldm_files(checkpoint: str, original_config: str, out_dir: str, num_classes: int = 1000) -> Path:
    """The ``ldm`` command: read, convert, check, write."""
    out = Path(out_dir)
    _check_out_dir(out)  # before the minutes of reading a large checkpoint
    config = load_original_config(original_config)
    state = load_checkpoint(checkpoint)
    converted = convert_ldm(state, config, checkpoint_name=Path(checkpoint).name,
                            config_name=Path(original_config).name, num_classes=num_classes)
    manifest = {
        "converter": "python -m bench.convert ldm",
        "checkpoint": Path(checkpoint).name,
        "checkpoint_sha256": _sha256(Path(checkpoint)),
        "checkpoint_keys": converted.used_keys,
        "original_config": Path(original_config).name,
        "original_config_sha256": _sha256(Path(original_config)),
    }
    return write_converted(out, converted, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.convert",
        description="Convert an original checkpoint into the diffusers layout that model.pretrained loads.",
    )
    families = parser.add_subparsers(dest="family", required=True)
    ldm = families.add_parser(
        "ldm", help="class-conditional latent diffusion (CompVis/latent-diffusion cin256-v2, LDM-4-G)"
    )
    ldm.add_argument("checkpoint", help="model.ckpt (a torch checkpoint with state_dict) or .safetensors")
    ldm.add_argument("original_config", help="its yaml, e.g. configs/latent-diffusion/cin256-v2.yaml")
    ldm.add_argument("out_dir", help="new directory for the diffusers layout (model.pretrained=<out_dir>)")
    ldm.add_argument("--num-classes", type=int, default=1000,
                     help="real classes; an extra embedding row is the null class (default 1000, ImageNet)")
    args = parser.parse_args(argv)
    try:
        out = convert_ldm_files(args.checkpoint, args.original_config, args.out_dir, args.num_classes)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted: {out} (use model.pretrained={out})")
    return 0

