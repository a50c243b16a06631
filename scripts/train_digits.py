"""Train the embedded default model: a small DDPM (and a digit classifier) on sklearn digits.

    HF_HUB_OFFLINE=1 python scripts/train_digits.py --out bench/assets/digits --seed 0

Writes into ``--out``:

``unet/``        diffusers ``UNet2DModel`` (EMA weights, safetensors), loadable with
                 ``UNet2DModel.from_pretrained(out, subfolder="unet")``.  Same block
                 layout as ``google/ddpm-cifar10-32`` (4 down blocks x 2 resnets,
                 attention in the second; 12 skip tensors), narrow channels,
                 1 input/output channel, 16x16 samples.
``scheduler/``   ``DDPMScheduler`` config (1000 steps, linear betas 1e-4..0.02,
                 epsilon prediction), as for the CIFAR-10 DDPM.
``classifier/``  ``metrics.digits.DigitClassifier`` (config.json + model.safetensors)
                 used by ``metrics.digits.DigitFeatureExtractor``.
``training.json`` seed, steps, wall times, threads, library versions, losses and
                 the classifier's held-out accuracy.

Everything is seeded from ``--seed`` (classifier: seed, U-Net: seed + 1), runs on
the CPU and, by default, on one torch thread, so the shipped weights are
reproducible with the same torch version.  Data: ``bench.models.digits`` train split
(1,497 images); the classifier accuracy is measured on the 300-image test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from bench.models.digits import IMAGE_SIZE, load_digits_images, load_digits_labels, to_model_space
from metrics.digits import DigitClassifier

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
UP_BLOCKS = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")


def make_unet(block_out_channels=(32, 32, 32, 32), norm_num_groups: int = 8):
    """UNet2DModel with the CIFAR-10 DDPM block layout, sized for 1 x 16 x 16 digits."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=2,
        down_block_types=DOWN_BLOCKS,
        up_block_types=UP_BLOCKS,
        norm_num_groups=norm_num_groups,
        # the remaining settings follow google/ddpm-cifar10-32's config
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        act_fn="silu",
        center_input_sample=False,
        mid_block_scale_factor=1,
        time_embedding_type="positional",
    )


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=True,
    )


def _log(msg: str) -> None:
    print(msg, flush=True)


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` pixels (zero padding)."""
    n, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


# ---------------------------------------------------------------------- classifier
def train_classifier(seed: int, epochs: int, batch_size: int, lr: float) -> tuple[DigitClassifier, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    x_train = torch.from_numpy(load_digits_images("train")).permute(0, 3, 1, 2).float()
    y_train = torch.from_numpy(load_digits_labels("train"))
    x_test = torch.from_numpy(load_digits_images("test")).permute(0, 3, 1, 2).float()
    y_test = torch.from_numpy(load_digits_labels("test"))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    last = float("nan")
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot = 0.0
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            xb = _shift(x_train[idx], gen)
            loss = F.cross_entropy(model(model.normalize(xb)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        last = tot / n
    model.eval()
    with torch.no_grad():
        train_acc = (model(model.normalize(x_train)).argmax(1) == y_train).float().mean().item()
        test_acc = (model(model.normalize(x_test)).argmax(1) == y_test).float().mean().item()
    info = {
        "seed": seed,
        "epochs": epochs,
        "steps": epochs * steps_per_epoch,
        "batch_size": batch_size,
        "lr": lr,
        "final_train_loss": last,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "wall_time_s": time.perf_counter() - t0,
        "params": sum(p.numel() for p in model.parameters()),
    }
    _log(f"classifier: train acc {train_acc:.4f}  held-out acc {test_acc:.4f}  ({info['wall_time_s']:.1f}s)")
    return model, info


# ---------------------------------------------------------------------- DDPM
@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def train_unet(
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    ema_decay: float,
    channels,
    groups: int,
    log_every: int,
    device: str = "cpu",
):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    unet = make_unet(channels, groups)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.to(dev)
    ema.to(dev)
    scheduler = make_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
    data = to_model_space(load_digits_images("train"))
    n = data.shape[0]
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 5 %
        if step < warmup:
            return lr * (step + 1) / warmup
        prog = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * prog)))

    unet.train()
    perm, pos = torch.randperm(n, generator=gen), 0
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        x0 = data[perm[pos : pos + batch_size]]
        pos += batch_size
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        # all randomness is drawn on the CPU, so another --device sees the same stream
        x0, noise, a, t = x0.to(dev), noise.to(dev), a.to(dev), t.to(dev)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        pred = unet(xt, t).sample
        loss = F.mse_loss(pred, noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        # EMA with the usual warm-up so early steps do not dominate a short run
        _ema_update(ema, unet, min(ema_decay, (1.0 + step) / (10.0 + step)))
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            el = time.perf_counter() - t0
            recent = float(np.mean(losses[-log_every:]))
            _log(f"unet step {step + 1}/{steps}  loss {recent:.4f}  lr {lr_at(step):.2e}  {el:.0f}s "
                 f"(eta {el / (step + 1) * (steps - step - 1):.0f}s)")
    wall = time.perf_counter() - t0
    tail = losses[-200:]
    info = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup,
        "lr_schedule": "linear warm-up, cosine decay to 5%",
        "optimizer": "AdamW(betas=(0.9, 0.999), weight_decay=0), grad-norm clip 1.0",
        "ema_decay": ema_decay,
        "weights_saved": "ema",
        "loss": "MSE(epsilon), t ~ U{0..999}",
        "final_loss_mean_last_200": float(np.mean(tail)),
        "loss_first_200_mean": float(np.mean(losses[:200])),
        "wall_time_s": wall,
        "params": sum(p.numel() for p in unet.parameters()),
        "block_out_channels": list(channels),
        "norm_num_groups": groups,
    }
    return ema.cpu(), scheduler, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/assets/digits", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = reproducible)")
    ap.add_argument("--steps", type=int, default=2600, help="U-Net optimisation steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--channels", type=int, nargs=4, default=[32, 32, 32, 32], metavar="C")
    ap.add_argument("--groups", type=int, default=8, help="GroupNorm groups")
    ap.add_argument("--clf-epochs", type=int, default=30)
    ap.add_argument("--clf-batch-size", type=int, default=64)
    ap.add_argument("--clf-lr", type=float, default=3e-3)
    ap.add_argument("--min-clf-accuracy", type=float, default=0.95)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--device", default="cpu",
                    help="device for the U-Net (the shipped weights are from the CPU; others are not bit-reproducible)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    import diffusers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    clf, clf_info = train_classifier(args.seed, args.clf_epochs, args.clf_batch_size, args.clf_lr)
    if clf_info["test_accuracy"] < args.min_clf_accuracy:
        _log(f"classifier held-out accuracy {clf_info['test_accuracy']:.4f} < {args.min_clf_accuracy}")
        return 1
    clf.save_pretrained(out / "classifier")

    unet, scheduler, unet_info = train_unet(
        args.seed + 1, args.steps, args.batch_size, args.lr, args.warmup, args.ema_decay,
        args.channels, args.groups, args.log_every, args.device,
    )
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")

    report = {
        "seed": args.seed,
        "command": "python scripts/train_digits.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "threads": args.threads,
        "device": args.device,
        "steps": args.steps,
        "wall_time_s": time.perf_counter() - t_start,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "data": {
            "source": "sklearn.datasets.load_digits, upscaled 8x8 -> 16x16 (bench.models.digits)",
            "train_images": int(load_digits_images("train").shape[0]),
            "test_images": int(load_digits_images("test").shape[0]),
            "split": "numpy.random.default_rng(0).permutation(1797); first 300 = test",
        },
        "unet": unet_info,
        "classifier": clf_info,
        "final_losses": {
            "unet_epsilon_mse_last_200_steps": unet_info["final_loss_mean_last_200"],
            "classifier_train_cross_entropy_last_epoch": clf_info["final_train_loss"],
        },
        "classifier_test_accuracy": clf_info["test_accuracy"],
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    for f in out.rglob("*"):  # safetensors writes 0600; make the assets world-readable
        if f.is_file():
            f.chmod(0o644)
    _log(f"done in {report['wall_time_s']:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
