"""Multi-crop views for self-distillation, made on the device after collation.

Order per step (all random numbers from CPU generators seeded by ``(seed, step, view)`` for the *global* batch,
then sliced to this rank's rows, so a tile's views do not depend on the batch split, the world size or the
device):

1. **Domain shift on the whole tile** at its native resolution (so physical units such as blur in µm stay right):
   shiftkit :class:`~shiftkit.StainAugment` and :class:`~shiftkit.RandomScanner` at training severities (held-out
   shifts never), drawn independently for each global view; then, where ``transfers`` are given, a learned scanner
   transfer (one of the profiles, strength 0.6–1.0 of the fitted real change, p 0.5). Local views crop from these
   shifted copies in turn.
2. **Geometry per view**: random resized crop (area ``scale``, aspect 3/4–4/3), horizontal and vertical flips
   (p 0.5 each), 90° rotations.
3. **Colour per view** (the DINO recipe with a pathology-safe hue, REFERENCES B6): brightness/contrast/saturation
   jitter 0.4/0.4/0.2 and hue ≤ 0.05 turns at p 0.8, grayscale at p 0.2, Gaussian blur σ 0.1–2 px at p 1.0 /
   0.1 (global views) and 0.5 (local views). No solarization.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from kornia.enhance import adjust_hue, adjust_saturation
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import crop_and_resize

from ..core.errors import UnknownNameError
from ..core.rng import derive_seed
from ..transforms.base import slice_parameters

#: What each ``augment`` preset adds to the geometric and colour views (step 1 above).
#: ``scanner`` draws from every training shift outside the stain family (the bundled training scanner transfers
#: included); ``synthetic`` leaves the learned transfers out, so that a study can add them alone (``transfers``).
AUGMENT_PRESETS: Dict[str, dict] = {
    "dino": {"stain": None, "scanner": None, "learned": True},
    "stain": {"stain": "medium", "scanner": None, "learned": True},
    "scanner": {"stain": None, "scanner": (1, 2), "learned": True},
    "synthetic": {"stain": "medium", "scanner": (1, 2), "learned": False},
    "shiftkit": {"stain": "medium", "scanner": (1, 2), "learned": True},
}

#: Severities of the learned-transfer view step (strength severity/5 of the fitted change) and its probability.
TRANSFER_SEVERITIES, TRANSFER_P = (3, 5), 0.5


def transfer_shift_names(transfers: Sequence[str]) -> List[str]:
    """``scanner-transfer:`` shift names of profiles (bundled names or JSON paths), refusing held-out ones: what a
    model trains on is never what the stress test reports as held-out."""
    from ..core.errors import InvalidArgumentError
    from ..shifts import get_spec

    names = []
    for t in transfers:
        name = t if str(t).startswith("scanner-transfer:") else f"scanner-transfer:{t}"
        spec = get_spec(name)
        if spec.held_out:
            raise InvalidArgumentError(f"`transfers` names a held-out profile: expected training profiles only, got {t!r} "
                                       "(its JSON has held_out: true; the stress test reports it as unseen)")
        names.append(spec.name)
    return names


class MultiCropAugment(torch.nn.Module):
    """DINO multi-crop views of a float batch ``(b, 3, H, W)`` in [0, 1], as a list of ``n_global + n_local``
    tensors (global views first).

    Args:
        n_global: number of global views.
        n_local: number of local views.
        global_size: output side of the global views, in pixels.
        local_size: output side of the local views, in pixels.
        global_scale: range of a global crop's area as a fraction of the tile.
        local_scale: range of a local crop's area as a fraction of the tile.
        augment: a key of :data:`AUGMENT_PRESETS` (``"shiftkit"`` = stain + scanner shifts; ``"dino"`` = none).
        mpp: µm per pixel of the tiles (scanner shifts are specified in µm).
        seed: run seed.
        transfers: learned scanner-transfer profiles (bundled names or JSON paths, training profiles only) applied
            as a view step of their own (strength 0.6–1.0, p 0.5), after the preset's shifts.
    """

    def __init__(self, n_global: int = 2, n_local: int = 6, global_size: int = 224, local_size: int = 96,
                 global_scale: Sequence[float] = (0.32, 1.0), local_scale: Sequence[float] = (0.05, 0.32),
                 augment: str = "shiftkit", mpp: float = 0.5, seed: int = 0, transfers: Sequence[str] = ()):
        super().__init__()
        if augment not in AUGMENT_PRESETS:
            raise UnknownNameError("augment", augment, AUGMENT_PRESETS)
        self.n_global, self.n_local = int(n_global), int(n_local)
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.augment, self.mpp, self.seed = augment, float(mpp), int(seed)
        self.transfers = list(transfers)
        preset = AUGMENT_PRESETS[augment]
        self.domain = torch.nn.ModuleList()
        if preset["stain"]:
            from ..transforms.stain_augment import StainAugment

            self.domain.append(StainAugment("macenko", preset=preset["stain"], seed=0))
        if preset["scanner"]:
            from ..transforms.random_scanner import RandomScanner

            shifts = None
            if not preset["learned"]:
                from ..shifts import get_spec, list_shifts

                shifts = [n for n in list_shifts(held_out=False) if get_spec(n).family not in ("stain", "scanner-transfer")]
            self.domain.append(RandomScanner(shifts, severity_range=preset["scanner"], mpp=self.mpp, p=0.5, seed=0))
        if self.transfers:
            from ..transforms.random_scanner import RandomScanner

            self.domain.append(RandomScanner(transfer_shift_names(self.transfers), severity_range=TRANSFER_SEVERITIES,
                                             mpp=self.mpp, p=TRANSFER_P, seed=0))

    def config(self) -> dict:
        return {"n_global": self.n_global, "n_local": self.n_local, "global_size": self.global_size,
                "local_size": self.local_size, "global_scale": list(self.global_scale),
                "local_scale": list(self.local_scale), "augment": self.augment, "mpp": self.mpp,
                "transfers": list(self.transfers)}

    def _gen(self, step: int, *tag) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, "views", int(step), *tag))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, step: int, offset: int = 0, global_batch: Optional[int] = None,
                twin: Optional[torch.Tensor] = None, has_twin: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Views of the rows ``offset .. offset + b`` of the global batch of ``step`` (size ``global_batch``).

        ``twin``: ``(b, 3, H, W)`` registered twins of the rows from another scanner, used where ``has_twin``
        ``(b,)`` is true as the source of the second global view, cropped with the first global view's box."""
        b = x.shape[0]
        gb = b if global_batch is None else int(global_batch)
        lo, hi = int(offset), int(offset) + b
        paired = twin is not None and has_twin is not None and self.n_global >= 2 and bool(has_twin.any())
        if paired:
            if twin.shape != x.shape:
                from ..core.errors import InvalidArgumentError

                raise InvalidArgumentError(f"`twin` does not match the batch: expected shape {tuple(x.shape)}, got {tuple(twin.shape)}")
            has = has_twin.to(x.device).view(-1, 1, 1, 1)
        shifted = []
        for v in range(self.n_global):
            y = torch.where(has, twin.to(x), x) if paired and v == 1 else x
            for t_i, t in enumerate(self.domain):
                full = t.draw_parameters((gb, *x.shape[1:]), self._gen(step, "domain", v, t_i))
                y = t(y, params=slice_parameters(full, lo, hi, gb))
            shifted.append(y)
        views = []
        for v in range(self.n_global + self.n_local):
            is_global = v < self.n_global
            src = shifted[v % self.n_global]
            size = self.global_size if is_global else self.local_size
            scale = self.global_scale if is_global else self.local_scale
            blur_p = (1.0 if v == 0 else 0.1) if is_global else 0.5
            p = self._draw(self._gen(step, "view", v), gb, scale, blur_p)
            p = {k: t[lo:hi].to(x.device) for k, t in p.items()}
            if paired and v == 0:
                box0 = {k: p[k] for k in ("area", "ratio", "x", "y")}
            if paired and v == 1:  # the twin's view: the partner's crop box (aligned tissue), its own flips and colour
                for k, t in box0.items():
                    p[k] = torch.where(has_twin.to(t.device), t, p[k])
            views.append(self._make_view(src, p, size))
        return views

    @staticmethod
    def _draw(g: torch.Generator, n: int, scale: Sequence[float], blur_p: float) -> Dict[str, torch.Tensor]:
        u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        area = scale[0] + (scale[1] - scale[0]) * u(n)
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u(n)
        return {
            "area": area, "ratio": log_r.exp(), "x": u(n), "y": u(n),
            "hflip": u(n) < 0.5, "vflip": u(n) < 0.5, "rot": torch.randint(0, 4, (n,), generator=g),
            "jitter": u(n) < 0.8, "brightness": 0.6 + 0.8 * u(n), "contrast": 0.6 + 0.8 * u(n),
            "saturation": 0.8 + 0.4 * u(n), "hue": -0.05 + 0.1 * u(n),
            "gray": u(n) < 0.2, "blur": u(n) < blur_p, "sigma": 0.1 + 1.9 * u(n),
        }

    @staticmethod
    def _make_view(x: torch.Tensor, p: Dict[str, torch.Tensor], size: int) -> torch.Tensor:
        b, _, h, w = x.shape
        if b == 0:
            return x.new_zeros((0, 3, size, size))
        cw = (p["area"] * p["ratio"]).sqrt().mul(w).clamp(max=w)
        ch = (p["area"] / p["ratio"]).sqrt().mul(h).clamp(max=h)
        x0, y0 = p["x"] * (w - cw), p["y"] * (h - ch)
        x1, y1 = x0 + cw - 1, y0 + ch - 1
        boxes = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                             torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], 1).to(x.dtype)
        y = crop_and_resize(x, boxes, (size, size), align_corners=True)
        y = torch.where(p["hflip"].view(-1, 1, 1, 1), y.flip(-1), y)
        y = torch.where(p["vflip"].view(-1, 1, 1, 1), y.flip(-2), y)
        rot = p["rot"].view(-1, 1, 1, 1)
        y = torch.where(rot == 1, y.rot90(1, (-2, -1)), torch.where(rot == 2, y.rot90(2, (-2, -1)),
                        torch.where(rot == 3, y.rot90(3, (-2, -1)), y)))
        # colour jitter (fixed order: brightness, contrast, saturation, hue)
        j = p["jitter"].view(-1, 1, 1, 1)
        c = y * p["brightness"].view(-1, 1, 1, 1).to(y.dtype)
        c = c.clamp(0, 1)
        grey = (0.299 * c[:, 0] + 0.587 * c[:, 1] + 0.114 * c[:, 2]).mean((-2, -1)).view(-1, 1, 1, 1)
        c = ((c - grey) * p["contrast"].view(-1, 1, 1, 1).to(y.dtype) + grey).clamp(0, 1)
        c = adjust_saturation(c, p["saturation"].to(y.dtype)).clamp(0, 1)
        c = adjust_hue(c, (p["hue"] * 2 * math.pi).to(y.dtype)).clamp(0, 1)
        y = torch.where(j, c, y)
        g = (0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]).expand(-1, 3, -1, -1)
        y = torch.where(p["gray"].view(-1, 1, 1, 1), g, y)
        if bool(p["blur"].any()):
            k = 2 * math.ceil(3 * float(p["sigma"].max())) + 1
            k = min(k, 2 * ((size - 1) // 2) + 1)
            sig = p["sigma"].to(y.dtype).view(-1, 1).expand(-1, 2)
            y = torch.where(p["blur"].view(-1, 1, 1, 1), gaussian_blur2d(y, (k, k), sig), y)
        return y.clamp(0, 1).contiguous()
