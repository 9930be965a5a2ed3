"""Plotting helpers shared by the trainers and the studies: sample grids and loss curves (PNG)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Save (B, 1, 28, 28) images in [-1, 1] as one PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().cpu().clamp(-1, 1), str(path), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    return path


@contextlib.contextmanager
def figure(path: str | Path, *args, dpi: int = 110, **kw):
    """plt.subplots(*args, **kw) as (fig, axes); on exit laid out tight, saved to `path` (PNG) and closed."""
    fig, axes = plt.subplots(*args, dpi=dpi, **kw)
    yield fig, axes
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_losses(panels: dict[str, tuple[list, dict[str, list]]], path: str | Path, xlabel: str = "iteration",
                smooth: int = 25) -> Path:
    """One panel per title {title: (x, {series: ys})}: raw curves faintly, a moving average on top; one PNG."""
    with figure(path, 1, len(panels), figsize=(7 * len(panels), 3.5), squeeze=False) as (_, axes):
        for ax, (title, (x, series)) in zip(axes[0], panels.items()):
            for i, (name, ys) in enumerate(series.items()):
                ax.plot(x, ys, color=f"C{i}", alpha=0.25, linewidth=0.7)
                if len(ys) > smooth:
                    t = torch.tensor(ys, dtype=torch.float64)
                    ma = torch.nn.functional.avg_pool1d(t.view(1, 1, -1), smooth, 1).flatten().tolist()
                    ax.plot(x[smooth - 1:], ma, color=f"C{i}", linewidth=1.4, label=f"{name} (moving avg {smooth})")
                else:
                    ax.plot(x, ys, color=f"C{i}", label=name)
            ax.set(xlabel=xlabel, ylabel="loss", title=title)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
    return Path(path)
