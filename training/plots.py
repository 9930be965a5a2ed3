"""Small plotting helpers shared by the trainers and reports: sample grids and loss curves (PNG)."""
from __future__ import annotations

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


def plot_losses(x: list, series: dict[str, list], path: str | Path, title: str = "", xlabel: str = "iteration",
                smooth: int = 25) -> Path:
    """Raw curves faintly, a moving average on top; one PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for i, (name, ys) in enumerate(series.items()):
        color = f"C{i}"
        ax.plot(x, ys, color=color, alpha=0.25, linewidth=0.7)
        if len(ys) > smooth:
            t = torch.tensor(ys, dtype=torch.float64)
            ma = torch.nn.functional.avg_pool1d(t.view(1, 1, -1), smooth, 1).flatten().tolist()
            ax.plot(x[smooth - 1:], ma, color=color, linewidth=1.4, label=f"{name} (moving avg {smooth})")
        else:
            ax.plot(x, ys, color=color, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
