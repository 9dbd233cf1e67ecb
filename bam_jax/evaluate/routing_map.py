"""The routing map as a picture: per domain, a layers x experts heatmap of the fraction of
tokens each expert receives, one row of panels for FFN experts and one for attention experts."""

from __future__ import annotations

import numpy as np

from bam_jax import storage


def routing_matrices(routing: dict) -> dict[str, dict[str, np.ndarray]]:
    """{'ffn' | 'attn': {domain: [layers, experts] array}} from evaluate_run's 'routing'."""
    matrices: dict[str, dict[str, np.ndarray]] = {}
    for domain, by_layer in routing.items():
        for kind in ('ffn', 'attn'):
            layers = sorted((name for name in by_layer if name.endswith('/' + kind)),
                            key=lambda name: int(name.split('/')[1]))
            if layers:
                matrices.setdefault(kind, {})[domain] = np.array([by_layer[name] for name in layers])
    return matrices


def save_routing_map(routing: dict, path: storage.Path, title: str = '', experts: dict | None = None
                     ) -> storage.Path | None:
    """Writes the PNG (path: local or a URI); None (nothing written) for a dense model.
    experts: {'ffn' | 'attn': each expert's name} for the axis (default 0, 1, ...)."""
    matrices = routing_matrices(routing)
    if not matrices:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    kinds, domains = list(matrices), list(routing)
    fig, axes = plt.subplots(len(kinds), len(domains), squeeze=False, layout='constrained',
                             figsize=(2.6 * len(domains) + 1, 2.4 * len(kinds) + 0.6))
    image = None
    for row, kind in enumerate(kinds):
        for col, domain in enumerate(domains):
            ax, grid = axes[row][col], matrices[kind][domain]
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap='viridis', aspect='auto')
            for (layer, expert), value in np.ndenumerate(grid):
                ax.text(expert, layer, f'{value:.2f}', ha='center', va='center', fontsize=7,
                        color='white' if value < 0.6 else 'black')
            ax.set_xticks(range(grid.shape[1]), (experts or {}).get(kind) or range(grid.shape[1]),
                          rotation=45 if (experts or {}).get(kind) else 0, fontsize=7)
            ax.set_yticks(range(grid.shape[0]))
            ax.set_title(f'{domain}: {kind}', fontsize=9)
            if col == 0:
                ax.set_ylabel('layer')
            if row == len(kinds) - 1:
                ax.set_xlabel('expert')
    fig.colorbar(image, ax=axes, shrink=0.8, label='fraction of tokens (soft routing, Lory: mean weight)')
    if title:
        fig.suptitle(title, fontsize=10)
    with path.open('wb') as f:  # through epath, so a bucket works too
        fig.savefig(f, format='png', dpi=110)
    plt.close(fig)
    return path
