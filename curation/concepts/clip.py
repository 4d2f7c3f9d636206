"""open_clip image and text towers: load (local weights only), decode + preprocess overlapped with the forward."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TINY_MODEL = "curation-tiny-clip"  # ViT, patch 16 at 64 px: random weights for tests (it cannot learn shapes)
# ResNet at 64 px, 32-token captions: what `curate models train-clip` trains (held-out zero-shot in bench/RESULTS.md)
TRAINABLE_MODEL = "curation-tiny-clip-rn"
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_registered = False


def register_tiny() -> None:
    """Register the project's tiny model configs with open_clip (idempotent)."""
    global _registered
    import open_clip

    if not _registered:
        for name in (TINY_MODEL, TRAINABLE_MODEL):
            if name not in open_clip.list_models():
                open_clip.add_model_config(CONFIG_DIR / f"{name}.json")
    _registered = True


def make_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save seeded random weights of the tiny model where `pretrained=str(path)` loads them."""
    import open_clip
    import torch

    register_tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_MODEL, pretrained=None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def cpu_has_bf16() -> bool:
    """True when the CPU does bf16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(precision: str, device: str) -> str:
    """Resolve "auto" deterministically: bf16 on CUDA or a bf16-capable CPU, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" or cpu_has_bf16() else "fp32"


@contextmanager
def _hub_offline():
    """Make huggingface_hub resolve from its local cache only (no request) for the duration."""
    import huggingface_hub.constants as hc

    old_env, old = os.environ.get("HF_HUB_OFFLINE"), hc.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hc.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = old
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def cached_weights(model: str, tag: str) -> str | None:
    """Local path of a hub tag's weights if already cached (the way open_clip would fetch them), else None."""
    import open_clip
    from open_clip import pretrained as opt

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if "file" in cfg:
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if opt.has_hf_hub() and cfg.get("hf_hub"):  # open_clip prefers the HF hub when both are set
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or opt.HF_WEIGHTS_NAME
        for name in [*opt._get_safe_alternatives(filename), filename]:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
        return None
    if cfg.get("url"):
        target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        return str(target) if target.is_file() else None
    return None


@dataclass
class Clip:
    """A loaded open_clip model with its preprocessing, tokenizer and identity."""

    model: Any
    model_id: str
    dim: int
    precision: str
    device: str
    image_size: tuple[int, int]
    pil_steps: list[Callable]  # the preprocess transform's PIL part (resize, crop, convert)
    scale: Any  # [1, 3, 1, 1] float32: 1 / (255 std)
    shift: Any  # [1, 3, 1, 1] float32: -mean / std
    tokenizer: Any
    preprocess: Any = field(repr=False)  # open_clip's own eval transform (reference)

    @property
    def dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def _prepare(self, images: list[bytes], start: int) -> tuple[Any, list[int], dict[int, str]]:
        """Decode and preprocess one batch: (uint8 [B, 3, H, W], input indices, errors)."""
        import torch
        from PIL import Image

        arrays, ok, errors = [], [], {}
        for i, data in enumerate(images, start):
            try:
                if not data:
                    raise ValueError("empty image bytes")
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    for step in self.pil_steps:
                        im = step(im)
                    arr = np.asarray(im, dtype=np.uint8)  # [H, W, 3]
                if arr.shape != (*self.image_size, 3):
                    raise ValueError(f"preprocessed to shape {arr.shape}, expected {(*self.image_size, 3)}")
                arrays.append(arr)
                ok.append(i)
            except Exception as e:  # any decode failure is a per-row error, never the batch's
                errors[i] = f"{type(e).__name__}: {e}"
        batch = (
            torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))) if arrays else None
        )  # [B, 3, H, W] uint8
        return batch, ok, errors

    def _normalise(self, batch):
        """uint8 [B, 3, H, W] -> model input in the model's dtype and device (ToTensor + Normalize as one affine)."""
        x = batch.to(self.device, non_blocking=True).float()  # [B, 3, H, W]
        return x.mul_(self.scale).add_(self.shift).to(self.dtype)  # [B, 3, H, W]

    def forward_images(self, pixels):
        """Model input [B, 3, H, W] -> L2-normalised float32 [B, D] (no grad)."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            return F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # [B, D]

    def encode_images(self, images: list[bytes], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Embed encoded images: (float32 [N_ok, D] unit rows, input indices that decoded, {index: error})."""
        chunks = [(s, images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
        embs, ok, errors = [], [], {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-decode") as pool:
            pending = [pool.submit(self._prepare, c, s) for s, c in chunks[:2]]  # prefetch bound: 2 batches
            for k in range(len(chunks)):
                batch, idx, errs = pending.pop(0).result()
                if k + 2 < len(chunks):
                    pending.append(pool.submit(self._prepare, chunks[k + 2][1], chunks[k + 2][0]))
                errors.update(errs)
                if batch is not None:
                    embs.append(self.forward_images(self._normalise(batch)).cpu().numpy())  # [B, D]
                    ok += idx
        emb = np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float32)  # [N_ok, D]
        return emb, np.asarray(ok, dtype=np.int64), errors

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Embed texts with the text tower: float32 [N, D] unit rows."""
        import torch
        import torch.nn.functional as F

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenizer(list(texts))  # [N, L]
        order = torch.argsort((tokens != 0).sum(1), stable=True)  # similar lengths share a batch
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)  # [N, D]
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                idx = order[s : s + batch_size]
                feats = self._encode_tokens(tokens[idx].to(self.device))  # [B, D]
                out[idx] = F.normalize(feats.float(), dim=-1).cpu()
        return out.numpy()

    def _encode_tokens(self, tokens):
        """Text tower on [B, L] tokens; for open_clip's causal CLIP text tower, the padding after the last EOT is
        cut off."""
        import torch
        from open_clip.model import CLIP
        from open_clip.transformer import text_global_pool

        m = self.model
        if type(m) is not CLIP or m.text_pool_type != "argmax" or m.attn_mask is None:
            return m.encode_text(tokens)  # [B, D]
        n = (
            int(tokens.argmax(dim=-1).max()) + 1
        )  # EOT has the largest id; causal attention: later tokens never reach it
        tokens = tokens[:, :n]  # [B, n]
        x = m.token_embedding(tokens).to(m.transformer.get_cast_dtype())  # [B, n, W]
        x = x + m.positional_embedding[:n].to(x.dtype)  # [B, n, W]
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n]))  # [B, n, W]
        x = text_global_pool(x, tokens, "argmax")  # [B, W]
        return (
            m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        )  # [B, D]


def _split_transform(preprocess) -> tuple[list[Callable], Any, Any]:
    """The eval transform's PIL steps, mean and std; raises if it is not PIL steps + ToTensor + Normalize."""
    from torchvision.transforms import Normalize, ToTensor

    steps = list(preprocess.transforms)
    if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        raise TypeError(f"unexpected open_clip preprocess transform: {preprocess}")
    return steps[:-2], steps[-1].mean, steps[-1].std


def weights_id(path: str) -> str:
    """File name plus a fingerprint of a local checkpoint (size, first and last MiB): cheap even for GB files."""
    h = hashlib.blake2b(digest_size=4)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    h.update(str(size).encode())
    return f"{Path(path).name}#{h.hexdigest()}"


def model_id_for(model: str, pretrained: str | None, precision: str = "auto", device: str = "auto") -> str:
    """The model_id load_clip would give, without building the model."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = (
        "random-init" if pretrained is None else weights_id(pretrained) if os.path.isfile(pretrained) else pretrained
    )
    return f"{model}/{weights}@{pick_precision(precision, device)}"


def load_clip(model: str, pretrained: str | None, precision: str = "auto", device: str = "auto") -> Clip:
    """Build an open_clip model from a local file or an already-cached hub tag; never downloads."""
    import open_clip
    import torch

    register_tiny()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = pick_precision(precision, device)
    name = model.replace("/", "-")
    if pretrained is None:
        weights = "random-init"
    elif os.path.isfile(pretrained):
        weights = weights_id(pretrained)
    elif model.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"model {model!r}: pass a built-in open_clip name with a local weights file as `pretrained`")
    elif name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; known: {', '.join(open_clip.list_models())}")
    elif not open_clip.get_pretrained_cfg(name, pretrained):
        raise ValueError(
            f"pretrained={pretrained!r} is neither a file nor a known tag of {model!r} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(name)}); pass the path of a local checkpoint"
        )
    elif cached_weights(name, pretrained) is None:
        raise ValueError(
            f"weights for {model!r} pretrained={pretrained!r} are not in the local cache and nothing is "
            f"downloaded here; "
            f"fetch them elsewhere and pass the file as pretrained=/path/to/checkpoint (.pt, .bin or .safetensors)"
        )
    else:
        weights = pretrained
    with _hub_offline():
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    net = net.eval()
    if precision != "fp32":
        net = net.to({"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    pil_steps, mean, std = _split_transform(preprocess)
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32, device=device) for v in (mean, std))  # [3], [3]
    size = net.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return Clip(
        model=net,
        model_id=f"{model}/{weights}@{precision}",
        dim=int(open_clip.get_model_config(name)["embed_dim"]),
        precision=precision,
        device=device,
        image_size=size,
        pil_steps=pil_steps,
        scale=(1.0 / (255.0 * std_t)).view(1, 3, 1, 1),
        shift=(-mean_t / std_t).view(1, 3, 1, 1),
        tokenizer=open_clip.get_tokenizer(model),
        preprocess=preprocess,
    )
