"""Routing analytics: how the MoE layers spread tokens over experts, by task and granularity.

RoutingStats sums each batch's per-(layer, task, granularity, expert) counts and router entropy
(the MoE layers' aux outputs); report() gives per layer the overall load and each cell's load,
token count and mean entropy; plot_routing draws one heatmap per layer.
"""
import collections
import io
import pathlib
from typing import Dict, Optional

import jax
import numpy as np

from skymoe_jax import storage
from skymoe_jax.data import tasks


def router_outputs_fn(model):
  """jit(params, *model inputs, condition=None) -> the MoE layers' aux outputs of one forward
  pass (what RoutingStats.add takes): the routing of a prompt, measured without generating.
  The inputs' task and granularity ids key the statistics; `condition` (SkyMoE.__call__), when
  given, is what routes instead (eval.tags='stripped': the keyword guess)."""
  return jax.jit(lambda params, *inputs, condition=None: model.apply(
      {'params': params}, *inputs, condition=condition)[1]['moe'])


class RoutingStats:
  """Accumulates the routing analytics over batches."""

  def __init__(self):
    self.counts = None        # [layers, tasks, granularities, E]
    self.entropy = collections.defaultdict(list)  # (task, granularity) -> [layers] per batch
    self.dropped, self.routed = 0, 0

  def add(self, moe_aux, task: str, granularity: str):
    if moe_aux is None:
      return
    counts = np.asarray(moe_aux['counts_by_condition'], np.float64)
    self.counts = counts if self.counts is None else self.counts + counts
    self.entropy[(task, granularity)].append(np.asarray(moe_aux['entropy'], np.float64))
    self.dropped += int(np.sum(moe_aux['num_dropped']))
    self.routed += int(np.sum(moe_aux['num_routed']))

  def report(self, moe_layers) -> Optional[Dict]:
    if self.counts is None:
      return None
    layers = {}
    for li, layer in enumerate(moe_layers):
      cells = {}
      for ti, task in enumerate(tasks.TASKS):
        for gi, gran in enumerate(tasks.GRANULARITIES):
          c = self.counts[li, ti, gi]
          if c.sum() == 0:
            continue
          cells[f'{task}/{gran}'] = {
              'load': (c / c.sum()).round(5).tolist(), 'routed': int(c.sum()),
              'entropy': float(np.mean([e[li] for e in self.entropy[(task, gran)]]))}
      total = self.counts[li].sum(axis=(0, 1))
      layers[f'layer_{layer}'] = {'load': (total / max(total.sum(), 1)).round(5).tolist(),
                                  'by_condition': cells}
    return {'layers': layers, 'token_drop_rate': self.dropped / max(self.routed, 1),
            'num_experts': int(self.counts.shape[-1])}


def plot_routing(routing: Dict, path: pathlib.Path) -> None:
  """One heatmap per MoE layer: rows task/granularity cells, columns experts."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  layers = routing['layers']
  fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 3.5), squeeze=False)
  for ax, (name, layer) in zip(axes[0], layers.items()):
    cells = sorted(layer['by_condition'])
    grid = np.asarray([layer['by_condition'][c]['load'] for c in cells])
    im = ax.imshow(grid, vmin=0, vmax=max(grid.max(), 1e-6), cmap='viridis', aspect='auto')
    ax.set_title(name)
    ax.set_xlabel('expert')
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(len(cells)))
    ax.set_yticklabels(cells if ax is axes[0][0] else [''] * len(cells), fontsize=7)
  fig.colorbar(im, ax=axes[0].tolist(), label='share of routed tokens')
  png = io.BytesIO()  # matplotlib writes local files only; the bytes go anywhere (gs://)
  fig.savefig(png, format='png', dpi=100, bbox_inches='tight')
  plt.close(fig)
  storage.write_bytes_atomically(path, png.getvalue())
